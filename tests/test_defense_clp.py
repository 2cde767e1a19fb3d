"""CLP: the channel bound, the conv -> BN pairing, the per-layer rule, pruning, and the backdoor."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import tiny_cnn
from rnp.defenses.clp import CLP, CLPConfig, channel_lipschitz_bounds, conv_batchnorm_pairs
from rnp.errors import RnpError
from rnp.metrics import evaluate_backdoor
from rnp.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def result(synthetic_backdoor):
    return CLP().fit(synthetic_backdoor.model, synthetic_backdoor.clean)


def _randomise_batchnorm(bn: nn.BatchNorm2d, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.num_features, generator=generator))
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.1)
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator))


class SumNet(nn.Module):
    """BN of a sum of two convolutions, as in a residual stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.bn(self.a(x) + self.b(x)).mean((2, 3)))


def test_bound_is_kernel_spectral_norm_times_batchnorm_gain():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, eps=1e-3)
    _randomise_batchnorm(bn, seed=1)
    expected = torch.stack([
        torch.linalg.matrix_norm(conv.weight[k].reshape(3, 9), ord=2)
        * bn.weight[k].abs() / torch.sqrt(bn.running_var[k] + bn.eps) for k in range(6)])
    assert (bn.weight < 0).any()
    assert torch.allclose(channel_lipschitz_bounds([conv], bn), expected.detach(), rtol=1e-5)


def test_bound_of_a_residual_sum_adds_the_kernel_norms():
    model = SumNet()
    _randomise_batchnorm(model.bn, seed=2)
    pairs, unpaired = conv_batchnorm_pairs(model, torch.zeros(1, 3, 8, 8))
    assert [(p.batchnorm, p.convs) for p in pairs] == [("bn", ("a", "b"))] and unpaired == []
    gain = model.bn.weight.abs() / torch.sqrt(model.bn.running_var + model.bn.eps)
    norms = [torch.linalg.matrix_norm(c.weight.reshape(5, 3, -1), ord=2) for c in (model.a, model.b)]
    assert torch.allclose(channel_lipschitz_bounds([model.a, model.b], model.bn),
                          ((norms[0] + norms[1]) * gain).detach(), rtol=1e-5)


def test_pairing_follows_the_data_in_preact_and_post_activation_nets():
    preact, _ = conv_batchnorm_pairs(build_model("preact_resnet18", width=8), torch.zeros(1, 3, 16, 16))
    pairs = {p.batchnorm: p.convs for p in preact}
    assert len(pairs) == 17
    assert pairs["layer1.0.bn1"] == ("conv1",)
    assert pairs["layer3.1.bn2"] == ("layer3.1.conv1",)
    assert pairs["layer2.1.bn1"] == ("layer2.0.conv2", "layer2.0.shortcut")
    for arch in ("resnet18", "vgg16_bn"):
        model = build_model(arch, width=8)
        pairs, unpaired = conv_batchnorm_pairs(model, torch.zeros(1, 3, 16, 16))
        assert not unpaired and all(len(p.convs) == 1 for p in pairs)
        assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_batchnorm_after_an_activation_is_not_paired_even_in_place():
    for relu in (nn.ReLU(), nn.ReLU(inplace=True)):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), relu, nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 2))
        assert conv_batchnorm_pairs(model, torch.zeros(1, 3, 8, 8)) == ([], ["2"])


def test_pruned_channels_are_the_layer_outliers_and_are_zero(synthetic_backdoor):
    # u = 2.5 pruned 4-9 channels over fixture seeds 0-4; the default u = 3 pruned none on one
    result = CLP(u=2.5).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
    pruning = result.report["pruning"]
    scores = result.artifacts["bounds"]
    assert pruning["pruned"] == len(pruning["channels"]) > 0
    assert pruning["total_channels"] == len(scores)
    original = synthetic_backdoor.model.state_dict()
    purified = result.model.state_dict()
    chosen = {(c["layer"], c["channel"]) for c in pruning["channels"]}
    for index, layer in enumerate(scores.layer_names):
        values = scores.values[scores.layers == index]
        threshold = values.mean() + 2.5 * values.std()
        for channel, value in enumerate(values.tolist()):
            pruned = (layer, channel) in chosen
            assert pruned == (value > threshold)
            if pruned:
                assert value >= values[[c for c in range(len(values)) if (layer, c) not in chosen]].max()
            for field in ("weight", "bias"):
                expected = 0.0 if pruned else original[f"{layer}.{field}"][channel]
                assert purified[f"{layer}.{field}"][channel] == expected
    changed = {k for k in original if not torch.equal(original[k], purified[k])}
    assert changed <= {f"{layer}.{f}" for layer, _ in chosen for f in ("weight", "bias")}
    assert not result.model.training


def test_u_sets_the_count_smaller_u_prunes_more(synthetic_backdoor, result):
    counts = []
    for u in (3.0, 2.0, 1.0, 0.0):
        pruning = CLP(u=u).fit(synthetic_backdoor.model, synthetic_backdoor.clean).report["pruning"]
        scores = result.artifacts["bounds"]
        expected = sum(int((v > v.mean() + u * v.std()).sum())
                       for v in (scores.values[scores.layers == i] for i in range(len(scores.sizes))))
        assert pruning["pruned"] == expected
        counts.append(pruning["pruned"])
    assert counts == sorted(counts) and counts[0] < counts[-1]


def test_zero_shift_off_keeps_beta(synthetic_backdoor):
    result = CLP(u=2.0, zero_shift=False).fit(synthetic_backdoor.model, synthetic_backdoor.clean)
    original, purified = synthetic_backdoor.model.state_dict(), result.model.state_dict()
    channel = result.report["pruning"]["channels"][0]
    layer, k = channel["layer"], channel["channel"]
    assert purified[f"{layer}.weight"][k] == 0
    assert purified[f"{layer}.bias"][k] == original[f"{layer}.bias"][k] != 0


def test_paper_default_misses_this_backdoor_and_a_lower_u_prunes_more(result, synthetic_backdoor):
    """On the tiny synthetic backdoor (8-64 channels per layer) u = 3 prunes 0-2 channels and the
    backdoor survives (ASR 1.00 over fixture seeds 0-4). Lowering u prunes more (u = 2: 8-19
    channels, u = 1: 69-84), but no u removed the backdoor at a small clean cost on every seed
    (u = 2 did on one of five), so CLP's efficacy is measured in the CIFAR-10 benchmarks."""
    sb = synthetic_backdoor
    default = evaluate_backdoor(result.model, sb.test, sb.triggered)
    assert default.attack_success_rate > 0.9
    counts = [len(CLP(u=u).fit(sb.model, sb.clean).report["pruning"]["channels"]) for u in (3.0, 2.0, 1.0)]
    assert counts[0] <= 3 and counts[0] < counts[1] < counts[2]


def test_data_free_the_clean_images_do_not_matter(synthetic_backdoor, result):
    other = synthetic_backdoor.test.subset(range(50))
    again = CLP().fit(synthetic_backdoor.model, other)
    assert again.report["pruning"]["channels"] == result.report["pruning"]["channels"]
    assert result.report["data_free"] and result.report["clean_images"] == len(synthetic_backdoor.clean)


def test_input_model_is_untouched(synthetic_backdoor):
    model = copy.deepcopy(synthetic_backdoor.model).train()
    before = copy.deepcopy(model.state_dict())
    CLP(u=1.0).fit(model, synthetic_backdoor.clean)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_conv_batchnorm_pair_is_refused(synthetic_backdoor):
    with pytest.raises(RnpError, match="no such pair"):
        CLP().fit(tiny_cnn(num_classes=10), synthetic_backdoor.clean)
    assert len(conv_batchnorm_pairs(tiny_cnn(batch_norm=True), torch.zeros(1, 3, 8, 8))[0]) == 1


def test_bad_settings_are_refused():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RnpError, match="u must be"):
            CLPConfig(u=bad)
    with pytest.raises(RnpError, match="no setting"):
        CLP(threshold=3)
