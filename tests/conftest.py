"""Shared fixtures: tiny timm models and a quiet CPU Trainer; the ``slow`` marker's switch.

Tests marked ``@pytest.mark.slow`` (more than ~10 s on 2 cores: real training, DDP processes, the quickstart)
are skipped by a plain local ``pytest``; ``pytest --runslow`` or the environment variable ``CI=true`` runs
them too (``.ci/run`` and the README's test command pass ``--runslow``).
"""
from __future__ import annotations

import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*litlogger.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread, as in the subprocess runs (OMP_NUM_THREADS=1) that tests compare with in-process
# runs: float sums are split differently with another thread count, and exact-resume comparisons would
# then differ in the last bits and drift apart over steps.
torch.set_num_threads(1)

from support.common import TINY_VIT, quiet_trainer_kwargs  # noqa: E402,F401  (tests import them from support)

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (CI does; also enabled by the environment CI=true)")


def run_slow(config: pytest.Config) -> bool:
    """Whether this session runs the slow tests: ``--runslow``, or ``CI=true`` in the environment."""
    return config.getoption("--runslow") or os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (or CI=true)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """End the worker processes of ``run_distributed`` (started by the first test that used it)."""
    distributed_utils = sys.modules.get("support.distributed_utils")
    if distributed_utils is not None:
        distributed_utils.shutdown_pools()
