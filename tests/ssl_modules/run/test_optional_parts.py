"""Optional parts (``ssl_modules.run.optional_parts``): a failure on one process is agreed by every process,
and the global random generators come out of an optional part as they went in."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from support.distributed_utils import run_distributed

from ssl_modules.run import distributed
from ssl_modules.run.optional_parts import PartFailedError, agreed_failure, isolated_rng


def _fail_on(rank: int, failing_rank: int, where: str) -> None:
    if rank == failing_rank:
        raise RuntimeError(f"{where} broke")


def _part(rank: int, failing_rank: int, where: str) -> dict:
    """Two gathers with local work before, between and after them; ``where`` says where ``failing_rank``
    raises. Returns what each process saw, then proves the processes are still in step (one more gather)."""
    seen: dict = {"gathered": 0}
    try:
        with agreed_failure("test part"):
            _fail_on(rank, failing_rank, where) if where == "before" else None
            distributed.all_gather_no_grad(torch.ones(2))
            seen["gathered"] += 1
            _fail_on(rank, failing_rank, where) if where == "between" else None
            distributed.all_reduce(torch.ones(1))
            seen["gathered"] += 1
            _fail_on(rank, failing_rank, where) if where == "after" else None
    except PartFailedError as failure:
        seen["failures"] = failure.failures
        seen["message"] = str(failure)
    seen["in_step"] = distributed.all_reduce(torch.tensor([float(rank)]), "sum").item()
    return seen


def _scenarios(rank: int, world_size: int) -> dict:
    """Every scenario in one pair of processes (starting processes is the slow part)."""
    return {"before": _part(rank, 1, "before"), "between": _part(rank, 1, "between"),
            "after": _part(rank, 1, "after"), "none": _part(rank, -1, "before"), "both": _both_fail(rank)}


@pytest.fixture(scope="module")
def scenarios() -> list[dict]:
    return run_distributed(_scenarios)


@pytest.mark.parametrize("where", ["before", "between", "after"])
def test_a_failure_on_rank_1_is_raised_on_every_process_naming_rank_1(scenarios, where):
    for seen in (result[where] for result in scenarios):
        assert seen["failures"] == {1: f"RuntimeError: {where} broke"}
        assert "on rank 1: RuntimeError" in seen["message"]
        assert seen["in_step"] == 1.0  # no process was left behind in a collective of the part
    assert scenarios[0][where]["gathered"] == {"before": 0, "between": 1, "after": 2}[where]


def test_no_failure_raises_nothing_and_leaves_the_processes_in_step(scenarios):
    for seen in (result["none"] for result in scenarios):
        assert "failures" not in seen and seen["gathered"] == 2 and seen["in_step"] == 1.0


def _both_fail(rank: int) -> dict:
    try:
        with agreed_failure("test part"):
            raise ValueError(f"rank {rank} broke")
    except PartFailedError as failure:
        return failure.failures
    return {}


def test_failures_on_several_processes_are_all_named(scenarios):
    assert [result["both"] for result in scenarios] == [{0: "ValueError: rank 0 broke",
                                                        1: "ValueError: rank 1 broke"}] * 2


def test_one_process_failure_is_a_part_failure_of_rank_0():
    with pytest.raises(PartFailedError, match="on rank 0: KeyError") as info:
        with agreed_failure("test part"):
            raise KeyError("x")
    assert isinstance(info.value.__cause__, KeyError)


def test_the_global_generators_come_out_as_they_went_in():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = torch.rand(2), np.random.rand(2), random.random()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with isolated_rng():
        torch.rand(5), np.random.rand(5), random.random()
        torch.manual_seed(99)
    after = torch.rand(2), np.random.rand(2), random.random()
    torch.testing.assert_close(after[0], expected[0])
    np.testing.assert_array_equal(after[1], expected[1])
    assert after[2] == expected[2]
