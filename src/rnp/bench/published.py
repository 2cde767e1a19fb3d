"""Published reference numbers to put beside a grid's (``rnp bench --compare``).

Three sources; the first two as collected in the project's RNP specification (section 10):

* The BackdoorBench leaderboard (Wu et al., "BackdoorBench: A Comprehensive Benchmark of
  Backdoor Learning", NeurIPS 2022 Datasets and Benchmarks; ``static/data/results.csv`` of
  backdoorbench.github.io): CIFAR-10, PreAct-ResNet18 at full width, 10% poisoning, all-to-one
  target 0. Cells are (CA, ASR) in percent. RNP is not in the leaderboard's data.
* The official RNP log (Li et al., ICML 2023; the authors' README run): CIFAR-10, ResNet-18,
  BadNets 10%, target 0, 500 clean images; CA there is measured on the 9,000 non-target test
  images, so ours is put beside it on the same images (``ca_metric``).
* A published reproduction of RNP at full scale: Karim et al., "Augmented Neural Fine-Tuning for
  Efficient Backdoor Purification" (NFT), ECCV 2024, arXiv 2407.10052, Table 1: CIFAR-10, 1% of
  the training set as clean data, the network most likely PreAct-ResNet18. Its RNP row is put
  beside both of our RNP rows (defaults and the paper preset); the attacks it shares with ours.

A source's ``cells`` are keyed by the grid's defense label, then attack: (CA, ASR) in percent.
"""

from __future__ import annotations

BACKDOORBENCH = {
    "source": "BackdoorBench leaderboard, CIFAR-10, PreAct-ResNet18 (width 64), 10% poisoning",
    "setting": {"arch": "preact_resnet18", "width": 64, "data": "CIFAR-10 (original PNG)",
                "clean_set": "5% of the training set for FP, NAD, ANP"},
    "cells": {
        "none": {"badnets": (91.3, 95.0), "blend": (93.5, 99.9), "wanet": (91.2, 89.7),
                 "input_aware": (90.7, 98.3), "sig": (84.5, 98.3), "low_frequency": (93.2, 99.3),
                 "label_consistent": (84.6, 99.9)},
        "ft": {"badnets": (90.0, 1.5), "blend": (92.8, 96.1), "wanet": (93.5, 17.1),
               "input_aware": (93.1, 1.7), "sig": (90.8, 2.4), "low_frequency": (92.4, 78.4),
               "label_consistent": (90.8, 11.3)},
        "fp": {"badnets": (91.3, 57.1), "blend": (93.2, 99.3), "wanet": (91.5, 1.1),
               "input_aware": (91.7, 0.0), "sig": (89.1, 26.2), "low_frequency": (92.9, 99.0),
               "label_consistent": (89.5, 0.4)},
        "nad": {"badnets": (89.9, 2.1), "blend": (92.2, 97.7), "wanet": (93.2, 23.0),
                "input_aware": (93.2, 1.7), "sig": (90.0, 10.7), "low_frequency": (92.4, 47.8),
                "label_consistent": (90.5, 11.3)},
        "nc": {"badnets": (89.0, 1.3), "blend": (93.5, 99.9), "wanet": (91.8, 7.5),
               "input_aware": (92.6, 0.8), "sig": (84.5, 98.3), "low_frequency": (91.6, 1.4),
               "label_consistent": (90.4, 7.0)},
        "anp": {"badnets": (84.2, 0.7), "blend": (86.6, 2.2), "wanet": (85.7, 0.4),
                "input_aware": (90.4, 1.6), "sig": (78.0, 0.0), "low_frequency": (85.1, 0.6),
                "label_consistent": (82.2, 4.8)},
        "ibau": {"blend": (87.0, 50.5), "wanet": (89.5, 5.2), "input_aware": (89.2, 27.1),
                 "sig": (85.7, 3.7), "low_frequency": (84.4, 45.0)},
        "clp": {"blend": (91.3, 99.7), "wanet": (81.9, 78.4), "input_aware": (90.3, 2.2),
                "sig": (83.8, 98.9), "low_frequency": (92.8, 99.2)},
    },
    "notes": {"anp": "pruning level chosen with test-set ASR (BackdoorBench issue #35): optimistic"},
}

RNP_LOG = {
    "source": "official RNP log (Li et al., ICML 2023), CIFAR-10, ResNet-18 (width 64), BadNets 10%",
    "setting": {"arch": "resnet18", "width": 64, "data": "CIFAR-10 (original PNG)", "epochs": 80,
                "clean_set": "500 images", "ca_metric": "clean_accuracy_non_target"},
    "cells": {"none": {"badnets": (93.40, 100.00)}, "rnp": {"badnets": (92.80, 6.61)}},
    "notes": {"rnp": "theirs pruned at mask threshold 0.20 (0.30 gives 92.77 / 1.72); ours by the auto rule"},
}

_NFT_RNP = {"badnets": (88.46, 2.75), "blend": (91.53, 0.91), "trojan": (87.39, 3.84),
            "sig": (86.46, 0.51), "label_consistent": (90.38, 6.12), "wanet": (90.26, 8.10),
            "input_aware": (90.05, 8.61), "lira": (87.59, 11.83), "bpp": (91.37, 9.74)}

NFT_REPRODUCTION = {
    "source": "NFT (Karim et al., ECCV 2024) Table 1, a published reproduction of RNP, CIFAR-10, 1% clean data",
    "setting": {"arch": "preact_resnet18", "width": 64, "data": "CIFAR-10 (original PNG)",
                "clean_set": "500 images", "poison_rate": None},
    "cells": {
        "none": {"badnets": (92.96, 100.0), "blend": (94.11, 100.0), "trojan": (89.57, 100.0),
                 "sig": (88.64, 100.0), "label_consistent": (92.78, 100.0), "wanet": (92.29, 98.64),
                 "input_aware": (92.52, 100.0), "lira": (92.15, 99.25), "bpp": (93.82, 99.70)},
        "rnp": _NFT_RNP,
        "rnp (paper)": _NFT_RNP,
    },
    "notes": {"rnp": "their RNP row (recipe not restated there); ours: the package defaults",
              "rnp (paper)": "their RNP row; ours: the published recipe"},
}

SOURCES = (BACKDOORBENCH, RNP_LOG, NFT_REPRODUCTION)
