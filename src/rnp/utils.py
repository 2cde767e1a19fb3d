"""Small helpers shared across rnp: seeding and progress bars."""

from __future__ import annotations

import contextlib
import hashlib
import random
import sys

import numpy as np
import torch
from tqdm import tqdm


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and PyTorch so that a run repeats exactly on the same machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, or None when disabled (callers pass it on and check for None)."""
    if not enabled:
        yield None
        return
    with tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield bar


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose ("poison", "shuffle", ...), independent of the other purposes.

    Two generators seeded with the same number draw the same permutation; if the poisoned
    indices and the first epoch's batch order both came from seed 0, every early batch would be
    poisoned. Hashing the purpose in keeps each stream separate while one user seed fixes all.
    """
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator_for(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
