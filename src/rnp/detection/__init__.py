"""Backdoor detection: what RNP's unlearned model exposes (target label, backdoored model,
poisoned training samples), trigger recovery and the usual detectors to compare with.

Neural Cleanse's trigger search lives in :mod:`rnp.defenses.trigger_reverse` (the NC defense runs
it, and detection, which builds on RNP's unlearning, sits above the defenses); it is exported
here too, with the MAD anomaly index and the collapse map's verdict of :mod:`rnp.metrics` (RNP
reads that map too, to find the class it prunes for)."""

from rnp.detection.collapse import detect_backdoor
from rnp.detection.exposure import (Exposure, LabelDetection, ModelDetection, detect_backdoored_model,
                                    detect_target_label, expose, expose_runs, run_summaries)
from rnp.detection.poisoned_samples import (SAMPLE_DETECTORS, ActivationClustering, LossScore,
                                            SpectralSignatures, Strip, UnlearnedMargin)
from rnp.detection.sample_scan import SampleScan, SampleScanConfig, scan_samples
from rnp.detection.trigger_recovery import (TriggerComparison, mask_iou, placed_iou, recover_on_both,
                                            trigger_success, true_trigger_mask)
from rnp.defenses.trigger_reverse import (RecoveredTrigger, TriggerReverseConfig, apply_trigger, flag_classes,
                                          output_classes, reverse_engineer_trigger)
from rnp.metrics.collapse import BackdoorVerdict, Calibration, CollapseMap, calibrate, collapse_map, judge
from rnp.metrics.detection import anomaly_indices

__all__ = ["BackdoorVerdict", "Calibration", "CollapseMap", "calibrate", "collapse_map", "detect_backdoor", "judge",
           "Exposure", "LabelDetection", "ModelDetection", "detect_backdoored_model", "detect_target_label",
           "expose", "expose_runs", "run_summaries", "SAMPLE_DETECTORS",
           "ActivationClustering", "LossScore", "SpectralSignatures", "Strip", "UnlearnedMargin",
           "SampleScan", "SampleScanConfig", "scan_samples",
           "TriggerComparison", "mask_iou", "placed_iou", "recover_on_both", "trigger_success", "true_trigger_mask",
           "RecoveredTrigger", "TriggerReverseConfig", "anomaly_indices", "apply_trigger",
           "flag_classes", "output_classes", "reverse_engineer_trigger"]
