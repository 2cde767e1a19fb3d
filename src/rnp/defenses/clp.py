"""Channel Lipschitzness-based Pruning (CLP), a data-free backdoor removal.

Zheng, Tang, Li and Liu, "Data-free Backdoor Removal based on Channel Lipschitzness",
ECCV 2022 (arXiv 2208.03111); code: github.com/rkteddy/channel-Lipschitzness-based-pruning.

Channels that a trigger switches on are unusually sensitive to small input changes. CLP
measures that sensitivity from the weights alone: for a convolution followed by a BatchNorm,
output channel ``k`` computes ``gamma_k (W_k * x) / sqrt(var_k + eps) + const``, so its
Lipschitz constant with respect to the layer input is at most the upper bound (UCLC)

    ``sigma_max(W_k as a C_in x (kh kw) matrix) * |gamma_k| / sqrt(var_k + eps)``.

Within each layer, channels whose bound exceeds ``mean + u * std`` of that layer's bounds are
pruned. No data is needed; the clean set a defense receives is accepted and left unused.

Defaults (the authors' release): ``u = 3`` (``test.py``); pruning zeroes both the BatchNorm
scale and shift of a channel (``defense.py`` sets ``weight`` and ``bias`` to 0), so the
channel outputs exactly 0. The standard deviation is the unbiased one (``torch.Tensor.std``,
as in the release).

Which convolution feeds which BatchNorm. The release pairs every BatchNorm with the last
``Conv2d`` registered before it: right for post-activation nets (conv -> BN), wrong for
PreAct-ResNet, whose blocks start with a BN of the residual sum and end with a convolution.
Here the pairing follows the data instead, on one forward pass of a blank image: a BatchNorm is
paired with the convolution whose output it normalises, found by walking back from its input
through the autograd graph. If that input is a sum of convolution outputs (a residual stream:
in PreAct-ResNet each block's first BN and the final BN), the BN is paired with all of them and
the bound uses the sum of their kernel norms, since the Lipschitz constant of a sum is at most
the sum of the summands' constants. On post-activation nets this is exactly the paper's UCLC.
Limits: a BatchNorm fed through anything but additions (an activation, an in-place change,
pooling, a concatenation as in DenseNet, a functional convolution) has no bound and is left
alone, listed in the report as unpaired; transposed convolutions are not considered; a model
with no pair at all is refused.

Deviations: (1) the pairing above, which differs from the release only where the release's
registration-order rule mis-pairs (pre-activation and other BN-before-conv designs); (2) the
bound uses ``running_var + eps`` (what the layer computes), the release omits ``eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.masks import ChannelScores, prune_channels
from rnp.errors import RnpError
from rnp.models.probes import capture_activations, eval_mode
from rnp.utils import check_config


@dataclass
class CLPConfig:
    """Every CLP hyperparameter."""

    u: float = 3.0
    """Prune the channels whose Lipschitz upper bound exceeds mean + u * std of their layer (paper;
    release test.py -u 3)."""
    zero_shift: bool = True
    """Zero BatchNorm's beta with its gamma, as the release does (paper); False: gamma only."""

    def __post_init__(self):
        check_config(self)
        if self.u < 0:
            raise RnpError(f"u must be a finite number >= 0, got {self.u!r}")


@dataclass(frozen=True)
class ConvBatchNormPair:
    """A BatchNorm layer and the convolution(s) whose output it normalises: one for
    conv -> BN, several when the BN normalises a residual sum of convolution outputs."""

    batchnorm: str
    convs: tuple[str, ...]


def conv_batchnorm_pairs(model: nn.Module,
                         example: torch.Tensor) -> tuple[list[ConvBatchNormPair], list[str]]:
    """The BatchNorm layers whose input is built from convolution outputs by additions only,
    each with those convolutions, and the names of the other (unpaired) BatchNorm layers.

    Runs ``model`` once on ``example`` in eval mode, recording each convolution's output and
    each BatchNorm's input, then follows the BatchNorm input back through the autograd graph:
    a convolution's own output node ends the walk, an addition splits it, anything else
    (activation, in-place change, pooling, concatenation, ...) leaves the BatchNorm unpaired.
    A BatchNorm called more than once is paired only if every call traced the same convolutions.
    """
    modules = dict(model.named_modules())
    produced: dict[object, str] = {}
    feeds: dict[str, list] = {name: [] for name, m in modules.items() if _has_bound(m)}

    def record_output(name: str, output: torch.Tensor) -> None:
        produced.setdefault(output.grad_fn, name)

    def record_input(name: str, inputs: torch.Tensor) -> None:
        feeds[name].append(inputs.grad_fn)

    convolutions = {name: m for name, m in modules.items()
                    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed}
    with (eval_mode(model), capture_activations(convolutions, record_output),
          capture_activations({name: modules[name] for name in feeds}, record_input, inputs=True),
          torch.enable_grad()):
        model(example.detach().clone().requires_grad_(True))
    pairs, unpaired = [], []
    for name, nodes in feeds.items():
        traced = {_trace_sum(node, produced) for node in nodes}
        if len(traced) == 1 and None not in traced:
            pairs.append(ConvBatchNormPair(name, traced.pop()))
        else:
            unpaired.append(name)
    return pairs, unpaired


def _trace_sum(node, produced: dict) -> tuple[str, ...] | None:
    """The convolutions whose outputs add up to the tensor made by autograd ``node``, or None
    if anything but additions lies between them."""
    if node in produced:
        return (produced[node],)
    if node is None or node.name() != "AddBackward0":
        return None
    convs = [_trace_sum(parent, produced) for parent, _ in node.next_functions]
    return None if None in convs else tuple(sorted(c for group in convs for c in group))


def _has_bound(module: nn.Module) -> bool:
    """A BatchNorm whose per-channel gain is fixed at inference: affine, with running stats."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
            and module.running_var is not None)


@torch.no_grad()
def kernel_spectral_norms(conv: nn.Module) -> torch.Tensor:
    """Per output channel, the largest singular value of its kernel reshaped to a
    ``(C_in / groups) x (kernel elements)`` matrix, as the CLP release reshapes it."""
    weight = conv.weight.detach().float()
    return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], weight.shape[1], -1), ord=2)


@torch.no_grad()
def channel_lipschitz_bounds(convs, batchnorm: nn.Module) -> torch.Tensor:
    """UCLC per BatchNorm channel: the kernel spectral norm of the convolution feeding it (the
    sum over the convolutions when it normalises their sum: a sum's Lipschitz constant is at
    most the sum of theirs) times ``|gamma| / sqrt(running_var + eps)``."""
    spectral = sum(kernel_spectral_norms(conv) for conv in convs)
    gain = batchnorm.weight.detach().float().abs() / torch.sqrt(batchnorm.running_var.float() + batchnorm.eps)
    return (spectral * gain).cpu()


def _pair_bounds(pair: ConvBatchNormPair, modules: dict) -> torch.Tensor:
    """The bounds of one pair's channels; RnpError where they cannot be computed (an SVD that
    does not converge) or are not finite (weights so large that the product overflows)."""
    try:
        bounds = channel_lipschitz_bounds([modules[c] for c in pair.convs], modules[pair.batchnorm])
    except torch.linalg.LinAlgError as error:
        raise RnpError(f"CLP cannot compute the spectral norms of {', '.join(pair.convs)}: "
                       f"{str(error).splitlines()[0]}") from None
    if not bool(torch.isfinite(bounds).all()):
        raise RnpError(f"CLP's Lipschitz bounds of {pair.batchnorm} are not finite: the weights "
                       "of that layer are too large for float32")
    return bounds


def layer_outliers(bounds: torch.Tensor, u: float) -> tuple[torch.Tensor, float]:
    """Indices of the channels whose bound exceeds ``mean + u * std`` (unbiased std), and that
    threshold. A layer of one channel has no spread and is never pruned."""
    if len(bounds) < 2:
        return torch.empty(0, dtype=torch.long), math.inf
    threshold = float(bounds.mean() + u * bounds.std())
    return torch.nonzero(bounds > threshold).flatten(), threshold


class CLP(RemovalDefense):
    """Channel Lipschitzness-based Pruning: ``CLP(u=3.0).fit(model, clean_data)``.

    Data-free: ``clean_data`` is only checked (as for every defense), never used. The result
    holds the pruned model, the bounds of every paired channel (``artifacts["bounds"]``, a
    ChannelScores over BatchNorm layers) and the conv -> BN pairs.
    """

    name = "clp"
    summary = ("Channel Lipschitzness-based Pruning, data-free: prune channels with outlying "
               "Lipschitz upper bounds (Zheng et al., ECCV 2022)")
    config_class = CLPConfig

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        timer = StageTimer()
        with timer.stage("pair"):
            blank = torch.zeros((1, *clean.images.shape[1:]), device=device)
            pairs, unpaired = conv_batchnorm_pairs(working, blank)
            if not pairs:
                raise RnpError(_no_pairs_message(working))
        with timer.stage("bounds"):
            modules = dict(working.named_modules())
            bounds = [_pair_bounds(pair, modules) for pair in pairs]
            scores = ChannelScores(tuple(p.batchnorm for p in pairs), tuple(map(len, bounds)),
                                   torch.cat(bounds))
        with timer.stage("prune"):
            selected, layers = self._select(pairs, bounds)
            prune_channels(working, scores, selected)
            if self.config.zero_shift:
                _zero_shift(working, scores, selected)
            working.eval()
        report = {**self.base_report(clean, timer), "data_free": True,
                  "pruning": {"rule": "bound > mean + u * std within each layer", "u": self.config.u,
                              "zero_shift": self.config.zero_shift, "pruned": len(selected),
                              "total_channels": len(scores),
                              "channels": [_describe(scores, pairs, int(i)) for i in selected]},
                  "layers": layers, "unpaired_batchnorm": unpaired}
        artifacts = {"bounds": scores, "pairs": pairs, "selected": selected}
        return DefenseResult(working, report, artifacts, dict(timer.seconds))

    def _select(self, pairs, bounds) -> tuple[torch.Tensor, list[dict]]:
        """Flat indices (into the concatenated bounds) of the channels to prune, and a summary
        per layer."""
        selected, layers, offset = [], [], 0
        for pair, values in zip(pairs, bounds):
            chosen, threshold = layer_outliers(values, self.config.u)
            selected.append(chosen + offset)
            layers.append({"layer": pair.batchnorm, "convs": list(pair.convs), "channels": len(values),
                           "mean": float(values.mean()), "max": float(values.max()),
                           "threshold": threshold, "pruned": len(chosen)})
            offset += len(values)
        return torch.cat(selected), layers


@torch.no_grad()
def _zero_shift(model: nn.Module, scores: ChannelScores, channels: torch.Tensor) -> None:
    """Zeroes the BatchNorm shift (beta) of the given channels, as the CLP release does."""
    modules = dict(model.named_modules())
    for index in channels.tolist():
        modules[scores.layer_names[int(scores.layers[index])]].bias[int(scores.channels[index])] = 0


def _describe(scores: ChannelScores, pairs, index: int) -> dict:
    layer = int(scores.layers[index])
    return {"layer": scores.layer_names[layer], "convs": list(pairs[layer].convs),
            "channel": int(scores.channels[index]), "value": float(scores.values[index])}


def _no_pairs_message(model: nn.Module) -> str:
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return (f"CLP needs a BatchNorm layer that normalises a convolution's output; the model has "
            f"{convs} convolution(s) and {norms} BatchNorm layer(s) but no such pair")
