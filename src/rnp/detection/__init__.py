"""Backdoor detection: recovering candidate triggers and scoring how anomalous they are."""

from rnp.detection.trigger_reverse import (RecoveredTrigger, TriggerReverseConfig, anomaly_indices,
                                           apply_trigger, flag_classes, output_classes,
                                           reverse_engineer_trigger)

__all__ = ["RecoveredTrigger", "TriggerReverseConfig", "anomaly_indices", "apply_trigger",
           "flag_classes", "output_classes", "reverse_engineer_trigger"]
