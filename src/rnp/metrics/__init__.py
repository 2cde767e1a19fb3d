"""Backdoor metrics, defined once: CA, ASR, RA and DER."""

from rnp.metrics.backdoor import BackdoorMetrics, accuracy, der, evaluate_backdoor

__all__ = ["BackdoorMetrics", "accuracy", "der", "evaluate_backdoor"]
