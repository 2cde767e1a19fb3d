import json

import pytest
import torch
from torch import nn

from rnp.errors import RnpError
from rnp.models import MODEL_NAMES, Normalize, build_model, count_parameters, model_spec
from rnp.models.normalize import CIFAR10_MEAN, CIFAR10_STD

WITH_BN = {"preact_resnet18": True, "resnet18": True, "vgg16_bn": True, "vgg16": False}


def test_model_names():
    assert MODEL_NAMES == ("preact_resnet18", "resnet18", "vgg16_bn", "vgg16")
    assert set(WITH_BN) == set(MODEL_NAMES)


@pytest.mark.parametrize("arch", MODEL_NAMES)
@pytest.mark.parametrize("num_classes, size", [(10, 32), (43, 16)])
def test_output_shape(arch, num_classes, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes, width=8)
    assert isinstance(model.normalize, Normalize)
    out = model(torch.rand(2, 3, size, size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", MODEL_NAMES)
def test_spec_round_trip(arch):
    spec = model_spec(arch, num_classes=43, width=8, in_channels=1, mean=(0.5,), std=(0.25,))
    assert json.loads(json.dumps(spec)) == spec
    assert set(spec) == {"arch", "num_classes", "width", "in_channels", "mean", "std"}

    torch.manual_seed(0)
    first = build_model(**spec).eval()
    torch.manual_seed(1)
    second = build_model(**spec).eval()
    second.load_state_dict(first.state_dict(), strict=True)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(first(x), second(x))


@pytest.mark.parametrize("arch", MODEL_NAMES)
def test_state_dict_has_no_normalize_buffers(arch):
    model = build_model(arch, width=8)
    assert not any(key.startswith("normalize.") for key in model.state_dict())
    assert dict(model.normalize.named_buffers()).keys() == {"mean", "std"}


@pytest.mark.parametrize("arch", MODEL_NAMES)
def test_width_scales_parameters(arch):
    ratio = count_parameters(build_model(arch, width=32)) / count_parameters(
        build_model(arch, width=16))
    assert 3.8 < ratio < 4.1


@pytest.mark.parametrize("arch", MODEL_NAMES)
def test_batch_norm_presence(arch):
    model = build_model(arch, width=8)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == WITH_BN[arch]


@pytest.mark.parametrize("kwargs", [
    {"arch": "resnet50"},
    {"arch": "resnet18", "width": 0},
    {"arch": "resnet18", "num_classes": 1},
    {"arch": "resnet18", "in_channels": 2},  # default mean/std exist for 1 and 3 channels only
    {"arch": "resnet18", "std": (0.2, 0.0, 0.2)},
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(RnpError):
        build_model(**kwargs)


def test_unknown_arch_message_lists_names():
    with pytest.raises(RnpError, match="preact_resnet18, resnet18, vgg16_bn, vgg16"):
        model_spec("resnet50")


def test_normalize_math():
    norm = Normalize(mean=(0.5, 0.0), std=(0.5, 2.0))
    x = torch.tensor([1.0, 0.5, 0.0, 1.0]).view(1, 2, 2, 1)  # channel 0: 1, .5; channel 1: 0, 1
    expected = torch.tensor([1.0, 0.0, 0.0, 0.5]).view(1, 2, 2, 1)
    torch.testing.assert_close(norm(x), expected)
    assert norm.mean.shape == (1, 2, 1, 1)
    assert norm.std.shape == (1, 2, 1, 1)
    assert len(norm.state_dict()) == 0


def test_cifar10_constants():
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert CIFAR10_STD == (0.2023, 0.1994, 0.2010)
