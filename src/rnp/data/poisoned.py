"""What an attack hands on: a poisoned training set and a triggered test set.

They live with the data, not with the attacks, because they are plain image sets with indices:
metrics, run folders and detectors read them without needing to know how a trigger is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rnp.data.images import ImageSet


def _no_indices() -> torch.Tensor:
    return torch.empty(0, dtype=torch.long)


@dataclass(frozen=True, eq=False)
class PoisonedSet:
    """A poisoned training set and the indices of the images the attack changed.

    ``poisoned_indices`` are the images that carry the backdoor trigger (relabelled, or for a
    clean-label attack kept in the target class). ``cover_indices`` are images the attack also
    changed but left with their true label, to make the backdoor harder to find or more
    specific (WaNet's noise mode, Adaptive-Blend's conservatism samples, BppAttack's
    negatives); they are not poisoned samples for detection purposes.
    """

    data: ImageSet
    poisoned_indices: torch.Tensor
    cover_indices: torch.Tensor = field(default_factory=_no_indices)


@dataclass(frozen=True, eq=False)
class TriggeredSet:
    """Triggered test images with their true labels (``data.labels``) and the attacker's labels.

    ``source_indices`` point into the clean test set, so clean accuracy can be measured on the
    very same (non-target) images.
    """

    data: ImageSet
    target_labels: torch.Tensor
    source_indices: torch.Tensor
