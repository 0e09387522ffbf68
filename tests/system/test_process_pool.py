"""The worker pool behind ``run_distributed``: results by rank, a failing rank's traceback, a hang that times
out, and calls after a failure that work again on fresh workers."""
from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist
from support.distributed_utils import run_distributed
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from ssl_modules.run import distributed


def _rank_facts(rank: int, world_size: int, offset: int) -> dict:
    """What each rank sees: its rank, the group's size, a sum over the group, its process id."""
    total = distributed.all_reduce(torch.tensor([float(rank + offset)]), "sum").item()
    return {"rank": rank, "world": world_size, "dist_rank": dist.get_rank(), "total": total, "pid": os.getpid(),
            "threads": torch.get_num_threads(), "seed": torch.initial_seed()}


def _fail_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise KeyError("rank 1 broke on purpose")
    return rank


def _hang_on_rank_0(rank: int, world_size: int) -> int:
    if rank == 0:
        time.sleep(60)
    return rank


def _die_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        os._exit(3)
    return rank


def _leave_state_behind(rank: int, world_size: int) -> None:
    """What a careless test could leave: an extra group, more threads, no autograd, an environment entry, a
    working directory."""
    dist.new_group([0, 1])
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    os.environ["RUN_DISTRIBUTED_LEFTOVER"] = "1"
    os.chdir("/")


def _state(rank: int, world_size: int) -> tuple:
    return (torch.get_num_threads(), torch.is_grad_enabled(), os.environ.get("RUN_DISTRIBUTED_LEFTOVER"),
            dist.get_world_size(), os.getcwd())


def test_results_come_back_by_rank_from_the_same_workers():
    first = run_distributed(_rank_facts, 2, (10,))
    assert [r["rank"] for r in first] == [0, 1] == [r["dist_rank"] for r in first]
    assert all(r["world"] == 2 and r["total"] == 21.0 and r["threads"] == 1 for r in first)
    second = run_distributed(_rank_facts, args=(0,))
    assert [r["total"] for r in second] == [1.0, 1.0]
    assert [r["pid"] for r in second] == [r["pid"] for r in first]  # the pool is reused
    for a, b in zip(first, second):  # every call reseeds, as a new interpreter does
        assert a["seed"] != b["seed"]


def test_no_state_leaks_from_one_call_into_the_next():
    run_distributed(_leave_state_behind)
    for threads, grad, leftover, world, cwd in run_distributed(_state):
        assert threads == 1 and grad and leftover is None and world == 2 and cwd == os.getcwd()


def test_a_failing_rank_is_reported_with_its_traceback_and_the_next_call_works():
    with pytest.raises(ProcessRaisedException) as caught:
        run_distributed(_fail_on_rank_1)
    message = str(caught.value)
    assert "Process 1 terminated" in message and "rank 1 broke on purpose" in message
    assert "_fail_on_rank_1" in message and "KeyError" in message  # the traceback text of rank 1
    assert caught.value.error_index == 1
    after = run_distributed(_rank_facts, 2, (1,))
    assert [r["total"] for r in after] == [3.0, 3.0]


@pytest.mark.slow  # a timeout and a pool restart
def test_a_hang_times_out_and_the_next_call_works():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"_hang_on_rank_0 did not finish within 3 s"):
        run_distributed(_hang_on_rank_0, timeout=3)
    assert time.monotonic() - start < 30
    assert [r["rank"] for r in run_distributed(_rank_facts, 2, (0,))] == [0, 1]


@pytest.mark.slow  # starts the workers again (several seconds on 2 cores), as the hang does
def test_a_worker_that_dies_is_reported_and_replaced():
    with pytest.raises(ProcessExitedException, match="exit code 3"):
        run_distributed(_die_on_rank_1, timeout=60)
    assert [r["rank"] for r in run_distributed(_rank_facts, 2, (0,))] == [0, 1]


def test_a_function_that_cannot_be_pickled_fails_in_the_caller_and_the_pool_stays():
    pid = run_distributed(_rank_facts, 2, (0,))[0]["pid"]
    with pytest.raises((pickle.PicklingError, AttributeError)):
        run_distributed(lambda rank, world_size: rank)
    assert run_distributed(_rank_facts, 2, (0,))[0]["pid"] == pid
