"""Run a function in several gloo processes from inside pytest and collect what each returns."""
from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, init_method: str, out_dir: str, args: tuple) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # every result is on disk
    except BaseException:
        dist.destroy_process_group()
        raise
    # No destroy_process_group on success: on torch 2.6 it sometimes waits forever in the last process once
    # the others have left; the process ends here and the operating system closes its sockets.
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = ()) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; return the results.

    ``fn`` must be importable (defined at module level). Results go through ``torch.save``. The processes
    meet over TCP on a free local port.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        mp.start_processes(_worker, args=(fn, world_size, init_method, tmp, args), nprocs=world_size,
                           start_method="spawn")
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
