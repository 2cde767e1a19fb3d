"""rnp: find and remove backdoors in trained neural networks with Reconstructive Neuron Pruning."""

__version__ = "0.1.0"

from rnp.defenses.rnp import RNP, RNPConfig  # noqa: E402

__all__ = ["RNP", "RNPConfig", "__version__"]
