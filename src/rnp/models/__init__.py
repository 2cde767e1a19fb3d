"""Image classifiers for backdoor experiments: PreAct-ResNet-18, ResNet-18 and VGG-16.

All models take images in [0, 1], normalise them in their first layer (``model.normalize``),
accept any input size (32x32 is the design size) and scale their channel counts with one ``width``.
"""

from rnp.models.normalize import Normalize
from rnp.models.registry import MODEL_NAMES, build_model, count_parameters, model_spec

__all__ = ["MODEL_NAMES", "Normalize", "build_model", "count_parameters", "model_spec"]
