"""Fixtures shared across test files, and the seed sweep's option."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import FIXTURE_SEED_VARIABLE, make_synthetic_backdoor, make_synthetic_clean_model
from rnp.utils import AMP_AUTO_VARIABLE


def pytest_addoption(parser):
    parser.addoption("--fixture-seed", type=int, default=None,
                     help="reseed every synthetic fixture (data, poisoned samples, initial weights); "
                          "0 is the default suite. The sweep: for s in 1 2 3 4; do pytest --fixture-seed $s; "
                          "done")


def pytest_configure(config):
    # amp "auto" computes in bfloat16 on CPUs that have it natively: float32 for the whole suite,
    # so every machine gets the same results (tests of the rule itself unset it)
    os.environ[AMP_AUTO_VARIABLE] = "off"
    seed = config.getoption("--fixture-seed")
    if seed is not None:
        os.environ[FIXTURE_SEED_VARIABLE] = str(seed)


def pytest_report_header(config):
    return f"fixture seed: {os.environ.get(FIXTURE_SEED_VARIABLE, '0')}"


@pytest.fixture(scope="session")
def synthetic_backdoor():
    """The tiny backdoored model every removal defense is tested on (trained once per session).

    Tests must not modify ``synthetic_backdoor.model``; defenses work on their own copy.
    """
    return make_synthetic_backdoor()


@pytest.fixture(scope="session")
def synthetic_clean_model():
    """A clean model on the synthetic images (trained once per session); tests must not modify it."""
    return make_synthetic_clean_model()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: tiny models run faster without thread contention,
    above all beside another job, and results do not depend on the machine's core count.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
