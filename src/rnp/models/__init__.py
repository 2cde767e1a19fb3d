"""Image classifiers for backdoor experiments: PreAct-ResNet-18, ResNet-18 and VGG-16.

All models take images in [0, 1], normalise them in their first layer (``model.normalize``),
accept any input size (32x32 is the design size) and scale their channel counts with one ``width``.
Their input channels follow ``in_channels`` (3 for RGB, 1 for grayscale data). :mod:`rnp.models.checks`
refuses models with non-finite weights or unusable outputs; :mod:`rnp.models.probes` runs a model
in eval mode for a block and records chosen modules' activations.
"""

from rnp.models.checks import check_finite_weights, check_logits
from rnp.models.normalize import Normalize
from rnp.models.probes import capture_activations, eval_mode
from rnp.models.registry import MODEL_NAMES, build_model, count_parameters, model_spec

__all__ = ["MODEL_NAMES", "Normalize", "build_model", "capture_activations", "check_finite_weights",
           "check_logits", "count_parameters", "eval_mode", "model_spec"]
