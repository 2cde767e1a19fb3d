"""Backdoor detection: what RNP's unlearned model exposes (target label, backdoored model,
poisoned training samples), trigger recovery and the usual detectors to compare with."""

from rnp.detection.exposure import (Exposure, LabelDetection, ModelDetection, detect_backdoored_model,
                                    detect_target_label, expose)
from rnp.detection.poisoned_samples import (SAMPLE_DETECTORS, ActivationClustering, LossScore,
                                            SpectralSignatures, Strip, UnlearnedMargin)
from rnp.detection.trigger_recovery import (TriggerComparison, mask_iou, recover_on_both,
                                            trigger_success, true_trigger_mask)
from rnp.detection.trigger_reverse import (RecoveredTrigger, TriggerReverseConfig, anomaly_indices,
                                           apply_trigger, flag_classes, output_classes,
                                           reverse_engineer_trigger)

__all__ = ["Exposure", "LabelDetection", "ModelDetection", "detect_backdoored_model", "detect_target_label", "expose", "SAMPLE_DETECTORS",
           "ActivationClustering", "LossScore", "SpectralSignatures", "Strip", "UnlearnedMargin",
           "TriggerComparison", "mask_iou", "recover_on_both", "trigger_success", "true_trigger_mask",
           "RecoveredTrigger", "TriggerReverseConfig", "anomaly_indices", "apply_trigger",
           "flag_classes", "output_classes", "reverse_engineer_trigger"]
