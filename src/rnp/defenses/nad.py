"""Neural Attention Distillation (NAD).

Li, Lyu, Koren, Lyu, Li and Ma, "Neural Attention Distillation: Erasing Backdoor Triggers
from Deep Neural Networks", ICLR 2021 (arXiv 2101.05930); authors' code:
github.com/bboylyg/NAD. Two stages on the defender's clean images:

1. *Teacher*: fine-tune a copy of the backdoored model (plain cross-entropy, the shared
   :func:`rnp.defenses.finetune.fine_tune`). Fine-tuning alone weakens the backdoor only
   partly, but it changes where the network attends.
2. *Student*: fine-tune the backdoored model itself with cross-entropy plus, at chosen
   layers ``l``, ``beta_l`` times the attention-distillation loss between student and (frozen,
   eval-mode) teacher. The attention map of a feature map ``a`` (N, C, H, W) is the channel
   mean of ``|a|^p``, flattened over positions and L2-normalised per image; the loss is the
   mean squared difference of the student's and teacher's maps (the authors' code; the
   paper writes the L2 distance, and the betas are calibrated for the code's form).

Layers: the paper distils at the outputs of the network's residual groups (WRN-16-1: its
three groups). For any model, ``layers=()`` picks the outputs of the last ``len(betas)``
top-level stages: the children of the model that contain a convolution (descending while
there is a single such child, e.g. VGG's ``features``), taking the last ones in
registration order -- for PreAct-ResNet18 and ResNet18 ``layer2``, ``layer3``, ``layer4``;
for VGG16 its last three convolutions. A model with fewer stages uses as many as it has,
paired with the last betas. ``layers`` may instead name the modules (4-D outputs required).
The loss is a mean over map positions, so the same betas weigh more on coarser maps: the
paper's WRN-16-1 groups give 32x32, 16x16 and 8x8 maps on CIFAR, PreAct-ResNet18's last three
stages 16x16, 8x8 and 4x4.

Defaults (``NADConfig``): paper section 4.1 and the authors' code -- SGD momentum 0.9
(Nesterov, as in the code), initial learning rate 0.1, weight decay 1e-4, batch 64, crop and
flip, 10 student epochs; learning rate divided by 10 after epoch 2 (the code's schedule);
betas 0 / 0 / 5000 for the three groups (the code's ``config.py``: distil at the last group
only), p = 2; the teacher is fine-tuned with the same recipe for 10 epochs (the authors'
README: "5~10 epochs"). Other toolkits distil at all three groups (e.g. 500 / 1000 / 1000):
``betas=(500, 1000, 1000)``.

Deviations: no Cutout (the package's loader offers crop and flip only); the code's released
run trains the student 20 epochs, the paper reports 10.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnp.data.images import ImageSet
from rnp.defenses.base import DefenseResult, RemovalDefense, StageTimer, prepare_inputs
from rnp.defenses.finetune import FineTuneFields, clean_accuracy, epoch_rows, fine_tune
from rnp.errors import RnpError
from rnp.models.probes import capture_activations, eval_mode
from rnp.training.precision import model_layout
from rnp.utils import resolve_precision


@dataclass
class NADConfig(FineTuneFields):
    """Every NAD hyperparameter; the inherited SGD fields drive both teacher and student."""

    epochs: int = 10
    """Epochs of the student's training (paper 4.1: 10; code config: 20)."""
    lr: float = 0.1
    """Initial learning rate of teacher and student (paper 4.1, code --lr)."""
    weight_decay: float = 1e-4
    """SGD weight decay (paper 4.1, code --weight_decay)."""
    nesterov: bool = True
    """Nesterov momentum (code: SGD(..., nesterov=True))."""
    milestones: tuple[int, ...] = (2,)
    """Epochs at which the learning rate is multiplied by gamma (code: 0.1 for 2 epochs, then
    0.01)."""
    teacher_epochs: int = 10
    """Epochs of fine-tuning that make the teacher (code README: the backdoored model fine-tuned 5
    to 10 epochs)."""
    betas: tuple[float, ...] = (0.0, 0.0, 5000.0)
    """Attention-distillation weight per layer group, the last for the deepest (code)."""
    power: float = 2.0
    """The attention map is |a|^power (paper, code --p)."""
    layers: tuple[str, ...] = ()
    """Modules to distil at, by name; empty: the outputs of the last len(betas) stages."""

    def __post_init__(self):
        super().__post_init__()
        self.betas = tuple(float(b) for b in self.betas)
        self.layers = tuple(str(n) for n in self.layers)
        if self.teacher_epochs < 1 or self.power <= 0:
            raise RnpError("teacher_epochs and power must be positive")
        if not self.betas or any(b < 0 for b in self.betas):
            raise RnpError("betas must be one or more non-negative weights")
        if self.layers and len(self.layers) != len(self.betas):
            raise RnpError(f"layers names {len(self.layers)} modules but betas has "
                           f"{len(self.betas)} weights; give one beta per layer")


def attention_map(features: torch.Tensor, power: float) -> torch.Tensor:
    """Channel mean of ``|features|^power``, flattened per image and L2-normalised: (N, H*W),
    in float32 also when the features come from a mixed-precision pass."""
    maps = features.float().abs().pow(power).mean(1).flatten(1)
    return F.normalize(maps, dim=1, eps=1e-6)


def stage_outputs(model: nn.Module, count: int) -> list[str]:
    """Names of the last ``count`` (or fewer) top-level stages of ``model`` that contain a
    convolution, descending while there is only one such child."""
    prefix, module = "", model
    while True:
        stages = [(name, child) for name, child in module.named_children()
                  if any(isinstance(m, nn.modules.conv._ConvNd) for m in child.modules())]
        if len(stages) != 1 or not list(stages[0][1].children()):
            break
        prefix, module = f"{prefix}{stages[0][0]}.", stages[0][1]
    if not stages:
        raise RnpError("NAD distils attention at convolutional stages, but the model has no "
                       "convolution; name 4-D feature-map modules with layers=...")
    return [prefix + name for name, _ in stages[-count:]]


class AttentionDistillation:
    """The penalty ``sum_l beta_l * MSE(A(student_l), A(teacher_l))`` for ``run_epoch``.

    Forward hooks record the attention maps of both models at the chosen layers; calling the
    object runs the teacher on the same batch, without gradients, and returns the loss. The
    values of every step are kept in ``values``. Call :meth:`remove` when done.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[str],
                 betas: tuple[float, ...], power: float):
        self.teacher, self.layers, self.betas, self.power = teacher, layers, betas, power
        self.student_maps: dict[str, torch.Tensor] = {}
        self.teacher_maps: dict[str, torch.Tensor] = {}
        self.values: list[float] = []
        self._captures = contextlib.ExitStack()
        for model, store in ((student, self.student_maps), (teacher, self.teacher_maps)):
            modules = {name: _submodule(model, name) for name in layers}
            self._captures.enter_context(capture_activations(modules, self._recorder(store)))

    def _recorder(self, store: dict):
        def record(name: str, output: torch.Tensor) -> None:
            # A clone, so that an in-place operation after this module (e.g. ReLU(inplace=True))
            # cannot alter the tensor the map's gradient needs.
            store[name] = attention_map(output.clone(), self.power)
        return record

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.teacher(images)
        loss = sum(beta * F.mse_loss(self.student_maps[name], self.teacher_maps[name])
                   for name, beta in zip(self.layers, self.betas))
        self.values.append(float(loss.detach()))
        return loss

    def remove(self) -> None:
        self._captures.close()


@torch.no_grad()
def check_feature_maps(model: nn.Module, layers: list[str], clean: ImageSet, device) -> None:
    """RnpError unless every layer outputs a 4-D tensor (N, C, H, W) on two clean images."""
    outputs = {}
    modules = {name: _submodule(model, name) for name in layers}
    with eval_mode(model), capture_activations(modules, outputs.setdefault):
        model(clean.images[:2].float().div(255).to(device))
    for name in layers:
        if name not in outputs:
            raise RnpError(f"layer {name!r} is not used in the model's forward pass")
        output = outputs[name]
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            kind = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise RnpError(f"NAD needs 4-D feature maps, but layer {name!r} outputs {kind}; "
                           "name other modules with layers=...")


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise RnpError(f"the model has no module {name!r} (layers=...)") from None


class NAD(RemovalDefense):
    """Neural Attention Distillation: ``NAD(**config).fit(model, clean_data)``; fields of
    :class:`NADConfig`. The report holds both trainings' trajectories (the student's with its
    mean attention loss per epoch) and the layers and betas used; ``artifacts["teacher"]`` is
    the fine-tuned teacher.
    """

    name = "nad"
    summary = ("Neural Attention Distillation: fine-tune a teacher, distil its attention maps "
               "into the backdoored student (Li et al., ICLR 2021)")
    config_class = NADConfig

    def purify(self, model: nn.Module, clean_data) -> DefenseResult:
        working, clean, device = prepare_inputs(model, clean_data)
        cfg = resolve_precision(self.config, device)
        layers, betas = self.distillation_layers(working)
        check_feature_maps(working, layers, clean, device)
        timer = StageTimer()
        before = clean_accuracy(working, clean, device)
        teacher = copy.deepcopy(working)
        with model_layout(teacher, cfg.channels_last), model_layout(working, cfg.channels_last):
            with timer.stage("teacher"):
                teacher_history = fine_tune(teacher, clean, **{**cfg.schedule(), "epochs": cfg.teacher_epochs},
                                            seed=cfg.seed, purpose="nad-teacher", progress=self.progress,
                                            device=device, mixed=cfg.amp == "on")
            teacher.requires_grad_(False)
            with timer.stage("distill"):
                history, attention = self.distill(working, teacher, clean, layers, betas, device,
                                                  cfg.amp == "on")
        rows = epoch_rows(history, cfg.lr, cfg.milestones, cfg.gamma)
        report = {
            **self.base_report(clean, timer, cfg),
            "teacher": {"fine_tuning": epoch_rows(teacher_history, cfg.lr, cfg.milestones, cfg.gamma),
                        "clean_accuracy": clean_accuracy(teacher, clean, device)},
            "distillation": {"layers": layers, "betas": list(betas), "power": cfg.power,
                             "per_epoch": [{**row, "attention_loss": value}
                                           for row, value in zip(rows, attention)]},
            "clean_accuracy_before": before,
            "clean_accuracy_after": clean_accuracy(working, clean, device),
        }
        return DefenseResult(working, report, {"teacher": teacher}, dict(timer.seconds))

    def distillation_layers(self, model: nn.Module) -> tuple[list[str], tuple[float, ...]]:
        """The layers to distil at and their betas (see the module docstring)."""
        cfg = self.config
        if cfg.layers:
            return list(cfg.layers), cfg.betas
        layers = stage_outputs(model, len(cfg.betas))
        return layers, cfg.betas[len(cfg.betas) - len(layers):]

    def distill(self, student: nn.Module, teacher: nn.Module, clean: ImageSet, layers: list[str],
                betas: tuple[float, ...], device, mixed: bool = False) -> tuple[list, list[float]]:
        """Stage 2: the student's fine-tuning with the attention penalty, in mixed precision
        when ``mixed``. Returns the epoch statistics and the mean attention loss of each epoch."""
        cfg = self.config
        penalty = AttentionDistillation(student, teacher, layers, betas, cfg.power)
        try:
            history = fine_tune(student, clean, **cfg.schedule(), seed=cfg.seed, purpose="nad-student",
                                penalty=penalty, progress=self.progress, device=device, mixed=mixed)
        finally:
            penalty.remove()
        means, start = [], 0
        for stats in history:
            means.append(sum(penalty.values[start:start + stats.steps]) / max(stats.steps, 1))
            start += stats.steps
        return history, means
