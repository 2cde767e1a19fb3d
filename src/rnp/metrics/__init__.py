"""Backdoor metrics, defined once: CA, ASR, RA and DER; detection metrics: AUROC, TPR at a FPR,
the MAD anomaly index; the collapse map of repeated unlearnings and its verdict."""

from rnp.metrics.backdoor import BackdoorMetrics, accuracy, der, evaluate_backdoor
from rnp.metrics.collapse import (BackdoorVerdict, Calibration, CollapseMap, calibrate, collapse_map,
                                  confusion_matrix, judge)
from rnp.metrics.detection import (anomaly_indices, auroc, false_alarm_bound, false_alarm_interval, positives_mask,
                                   share_above, threshold_at_fpr, tpr_at_fpr)

__all__ = ["BackdoorMetrics", "accuracy", "der", "evaluate_backdoor", "BackdoorVerdict", "Calibration",
           "CollapseMap", "calibrate", "collapse_map", "confusion_matrix", "judge", "anomaly_indices", "auroc",
           "false_alarm_bound", "false_alarm_interval", "positives_mask", "share_above", "threshold_at_fpr",
           "tpr_at_fpr"]
