"""What the issue-15 probes share: a width-32 subject named by one of its grid cells, and an
ORACLE evaluation on 1,000 test images (CA, ASR in %), which judges and chooses nothing."""

import json
import os

import torch

from rnp.bench.cells import _load_subject
from rnp.data.clean_subset import select_clean_subset
from rnp.metrics.backdoor import accuracy
from rnp.training.evaluate import predict

DATA_CACHE = os.environ.get("RNP_CACHE_DIR", os.path.expanduser("~/.cache/rnp/data"))


def subject_and_oracle(cell_file: str, images: int = 1000):
    """The subject of the cell record (its run, clean pool and exclusions) and ``oracle(model)``."""
    record = json.load(open(cell_file))
    subject = _load_subject(record["subject_run"], DATA_CACHE, record["data_spec"])
    test, triggered = subject["run"].data.test, subject["triggered"]
    generator = torch.Generator().manual_seed(0)
    test_pick = torch.randperm(len(test), generator=generator)[:images]
    trigger_pick = torch.randperm(len(triggered.data), generator=generator)[:images]
    test_subset, triggered_subset = test.subset(test_pick), triggered.data.subset(trigger_pick)
    targets = triggered.target_labels[trigger_pick]

    def oracle(model):
        ca = accuracy(predict(model, test_subset), test_subset.labels)
        asr = accuracy(predict(model, triggered_subset), targets)
        return round(100 * float(ca), 1), round(100 * float(asr), 1)

    return subject, oracle


def clean_sets(subject: dict, seeds: str, size: int = 500):
    """``(seed, clean images)`` for each of the comma-separated clean ``seeds``, drawn as the
    grid's cells draw them (the seed also seeds RNP there)."""
    for seed in (int(s) for s in seeds.split(",")):
        yield seed, select_clean_subset(subject["pool"], size, seed=seed, exclude=subject["exclude"])[0]
