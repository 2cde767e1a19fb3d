"""Backdoor metrics, defined once: CA, ASR, RA and DER; detection metrics: AUROC, TPR at a FPR."""

from rnp.metrics.backdoor import BackdoorMetrics, accuracy, der, evaluate_backdoor
from rnp.metrics.detection import auroc, positives_mask, threshold_at_fpr, tpr_at_fpr

__all__ = ["BackdoorMetrics", "accuracy", "der", "evaluate_backdoor", "auroc", "positives_mask",
           "threshold_at_fpr", "tpr_at_fpr"]
