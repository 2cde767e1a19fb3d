"""Channel masks on BatchNorm, LayerNorm, convolution and linear layers; pruning each kind."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import separable_image_set
from rnp import RNP
from rnp.defenses import MaskSet, maskable_layers, prune_channels
from rnp.errors import RnpError
from rnp.models import build_model


class TinyTransformer(nn.Module):
    """A vision transformer in miniature: 4x4 patches, one pre-norm encoder layer, mean pool."""

    def __init__(self, num_classes: int = 4, dim: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=32, dropout=0.0,
                                                  batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def mlp(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 12), nn.ReLU(), nn.Linear(12, num_classes))


def names(layers):
    return [name for name, _ in layers]


def test_auto_prefers_batchnorm_then_layernorm_then_conv_and_linear():
    resnet = build_model("preact_resnet18", num_classes=4, width=8)
    assert {type(m) for _, m in maskable_layers(resnet)} == {nn.BatchNorm2d}
    assert {type(m) for _, m in maskable_layers(TinyTransformer())} == {nn.LayerNorm}
    vgg = build_model("vgg16", num_classes=4, width=8)
    layers = maskable_layers(vgg)
    assert {type(m) for _, m in layers} == {nn.Conv2d} and len(layers) == 13


def test_the_last_linear_layer_is_the_classifier_and_carries_no_mask():
    assert names(maskable_layers(mlp(), "linear")) == ["1"]
    assert names(maskable_layers(TinyTransformer(), "linear")) == [
        "encoder.self_attn.out_proj", "encoder.linear1", "encoder.linear2"]


def test_explicit_kinds_are_honoured_and_checked():
    vgg = build_model("vgg16_bn", num_classes=4, width=8)
    assert {type(m) for _, m in maskable_layers(vgg, "conv")} == {nn.Conv2d}
    assert len(maskable_layers(vgg, ["batchnorm", "conv"])) == 26
    with pytest.raises(RnpError, match="mask layers must be"):
        maskable_layers(vgg, "attention")
    with pytest.raises(RnpError, match="no batchnorm layer.*Linear x2"):
        maskable_layers(mlp(), "batchnorm")
    with pytest.raises(RnpError, match="no BatchNorm, LayerNorm"):
        maskable_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


@pytest.mark.parametrize("kind", ["conv", "linear", "layernorm"])
def test_a_zero_mask_silences_its_channel_down_to_the_bias(kind):
    torch.manual_seed(0)
    model = {"conv": lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 36, 2)),
             "linear": mlp, "layernorm": TinyTransformer}[kind]()
    masks = MaskSet(model, kind)
    name, layer = masks.layers[0]
    outputs = []
    handle = layer.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        masks.parameters[0][1] = 0.0
        model(torch.rand(2, 3, 8, 8))
    handle.remove()
    channel = outputs[0][:, 1] if kind == "conv" else outputs[0][..., 1]
    assert torch.allclose(channel, layer.bias[1].expand_as(channel))
    other = outputs[0][:, 0] if kind == "conv" else outputs[0][..., 0]
    assert not torch.allclose(other, layer.bias[0].expand_as(other))
    assert len(masks.scores()) == sum(module.weight.shape[0] for _, module in masks.layers)


@pytest.mark.parametrize("kind", ["conv", "linear", "layernorm", "batchnorm"])
def test_pruning_zeroes_exactly_the_chosen_channels(kind):
    model = TinyTransformer() if kind in ("linear", "layernorm") else build_model("vgg16_bn", 4, width=8)
    scores = MaskSet(copy.deepcopy(model), kind).scores()
    pruned = prune_channels(copy.deepcopy(model), scores, [0, 3])
    modules = dict(pruned.named_modules())
    for index in range(len(scores)):
        layer, channel = scores.layer_names[int(scores.layers[index])], int(scores.channels[index])
        weight = modules[layer].weight[channel]
        assert bool((weight == 0).all()) == (index in (0, 3))


def test_rnp_runs_on_a_model_without_batchnorm_and_prunes_convolution_filters():
    torch.set_num_threads(1)
    clean = separable_image_set(n=64, num_classes=4, size=8, seed=1)
    torch.manual_seed(0)
    model = build_model("vgg16", num_classes=4, width=8)
    result = RNP(batch_size=16, unlearn_epochs=2, recover_epochs=2, prune_rule="number",
                 prune_number=3).fit(model, clean)
    assert result.report["mask_layers"] == {"setting": "auto", "layer_types": ["Conv2d"], "layers": 13}
    assert len(result.masks) == sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    modules = dict(result.model.named_modules())
    zeroed = [(name, c) for name, m in modules.items() if isinstance(m, nn.Conv2d)
              for c in range(m.out_channels) if bool((m.weight[c] == 0).all())]
    assert set(zeroed) == {(d["layer"], d["channel"]) for d in result.report["pruning"]["channels"]}
    assert len(zeroed) == 3
    assert not any(bool((m.weight == 0).all(dim=(1, 2, 3)).any()) for m in model.modules()
                   if isinstance(m, nn.Conv2d))


def test_rnp_on_a_transformer_masks_its_layernorms():
    torch.set_num_threads(1)
    clean = separable_image_set(n=64, num_classes=4, size=8, seed=1)
    result = RNP(batch_size=16, unlearn_epochs=2, recover_epochs=2).fit(TinyTransformer(), clean)
    assert result.report["mask_layers"]["layer_types"] == ["LayerNorm"]
    assert len(result.masks) == 3 * 16
    with pytest.raises(RnpError, match="mask layers must be"):
        RNP(mask_layers="conv,bn")


def test_masks_live_on_the_models_device():
    """A model on another device (here PyTorch's shape-only "meta" device, standing in for a GPU)
    gets its masks there too, so that the masked forward pass does not mix devices."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to("meta")
    masks = MaskSet(model)
    assert masks.parameters[0].device.type == "meta"
    assert model(torch.empty(1, 3, 8, 8, device="meta")).shape == (1, 4, 6, 6)
