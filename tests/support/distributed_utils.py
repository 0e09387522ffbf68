"""Run a function in several gloo processes from inside pytest and collect what each returns.

The processes are a pool started on first use and kept for the rest of the test session (one interpreter per
rank; starting interpreters and importing torch is most of a 2-process test's time). Every call is a fresh
start of the distributed part: a new rendezvous on a free port, a new gloo process group, destroyed after the
call; the random generators reseeded from entropy as in a new interpreter, one intra-op thread, the caller's
``sys.path``, environment and working directory. A worker that dies or does not answer in time (a hang, or a
rank left waiting for a failed one) ends the pool: the next call starts a new one. ``shutdown_pools`` ends it
at the end of the session (``tests/conftest.py``); an ``atexit`` hook does it otherwise.
"""
from __future__ import annotations

import atexit
import io
import os
import pickle
import random
import signal
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

__all__ = ["run_distributed", "shutdown_pools", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0  # a hung collective fails the test after this long instead of never
_FAILURE_GRACE_S = 10.0  # after one rank failed, how long the others may take to answer before being killed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _dumps(value: Any) -> bytes:
    """``value`` as bytes through ``torch.save`` (tensors, modules and functions by reference)."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


# ------------------------------------------------------------------------------------------------ worker side

@dataclass(frozen=True)
class _Call:
    """One call as a worker receives it; ``payload`` is ``(fn, args)`` through ``torch.save``, unpickled only
    once ``sys_path`` is in place (it imports ``fn``'s module)."""

    sys_path: list[str]
    environ: dict[str, str]
    cwd: str
    init_method: str
    world_size: int
    timeout_s: float
    payload: bytes


@dataclass(frozen=True)
class _FreshState:
    """What a new worker interpreter starts with, restored before every call."""

    default_dtype: torch.dtype
    deterministic: bool
    handlers: dict[int, Any]

    @classmethod
    def capture(cls) -> _FreshState:
        handlers = {}
        for number in signal.valid_signals():
            try:
                handlers[number] = signal.getsignal(number)
            except (OSError, ValueError):  # pragma: no cover - signals Python cannot query
                continue
        return cls(torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled(),
                   {number: handler for number, handler in handlers.items() if handler is not None})

    def restore(self, call: _Call) -> None:
        """The caller's paths and environment, and this interpreter's initial torch, RNG and signal state."""
        sys.path[:] = call.sys_path
        os.environ.clear()
        os.environ.update(call.environ)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.chdir(call.cwd)
        torch.seed()  # seeds from the operating system's entropy, as a new interpreter has them (torch's
        random.seed()  # default generator too): a test seeds what it compares, as it had to with new processes
        np.random.seed()
        torch.set_num_threads(1)
        torch.set_grad_enabled(True)
        torch.set_default_dtype(self.default_dtype)
        torch.use_deterministic_algorithms(self.deterministic)
        for number, handler in self.handlers.items():
            if signal.getsignal(number) is not handler:
                signal.signal(number, handler)


def _serve(rank: int, conn: Connection) -> None:
    """A worker's loop: run each call it receives until the pool closes its end (or sends ``b""``)."""
    fresh = _FreshState.capture()
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not request:
            return
        _handle(request, rank, fresh, conn)


def _handle(request: bytes, rank: int, fresh: _FreshState, conn: Connection) -> None:
    """Run one call in a new process group and send ``("ok", result)``, or ``("error", traceback text)`` and
    ``("ready", None)`` once the group is destroyed: destroying it may wait for a rank stuck in a collective,
    and the pool replaces a worker that does not get ready again."""
    joined = False
    try:
        call: _Call = pickle.loads(request)
        fresh.restore(call)
        fn, args = _loads(call.payload)
        dist.init_process_group("gloo", init_method=call.init_method, rank=rank, world_size=call.world_size,
                                timeout=timedelta(seconds=call.timeout_s))
        joined = True
        with warnings.catch_warnings():
            result = fn(rank, call.world_size, *args)
        dist.barrier()  # no rank leaves while another still uses the group
        reply = _dumps(("ok", result))
    except BaseException:
        conn.send_bytes(_dumps(("error", traceback.format_exc())))
        _destroy_groups(joined)
        conn.send_bytes(_dumps(("ready", None)))
        return
    _destroy_groups(joined)
    conn.send_bytes(reply)


def _destroy_groups(joined: bool) -> None:
    """Destroy the default group and every group made from it (the next call starts clean)."""
    if joined and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ pool side

@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection


class _Pool:
    """``size`` long-lived worker processes, one per rank."""

    def __init__(self, size: int) -> None:
        context = get_context("spawn")
        self.workers: list[_Worker] = []
        self.broken = False
        for rank in range(size):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(rank, theirs), name=f"run_distributed rank {rank}")
            process.start()
            theirs.close()
            self.workers.append(_Worker(process, ours))

    def alive(self) -> bool:
        return all(worker.process.is_alive() for worker in self.workers)

    def call(self, fn: Callable[..., Any], request: bytes, timeout_s: float) -> list[Any]:
        """Every rank's result of the call in ``request`` (``fn``'s); raises the first rank's failure.

        ``broken`` tells afterwards whether the workers must be replaced: one died, or did not answer and get
        ready for the next call in time (a hang; a rank left waiting in a collective for a failed one).
        """
        self.broken = True  # until every rank is ready for the next call
        for worker in self.workers:
            worker.conn.send_bytes(request)
        replies, ready = self._replies(timeout_s)
        self.broken = len(ready) < len(self.workers)
        for status, value in replies.values():  # in the order they came
            if status != "ok":
                raise value
        if len(replies) < len(self.workers):
            missing = sorted(set(range(len(self.workers))) - set(replies))
            raise TimeoutError(f"{_name(fn)} did not finish within {timeout_s:g} s on rank(s) {missing} (a hang?); "
                               "the worker processes were restarted")
        return [replies[rank][1] for rank in range(len(self.workers))]

    def _replies(self, timeout_s: float) -> tuple[dict[int, tuple[str, Any]], set[int]]:
        """``rank -> (status, result or exception)`` in the order the ranks answered, and the ranks ready for
        the next call, once all are or the time is up; after a failure the others get ``_FAILURE_GRACE_S``
        more seconds (a rank waiting for the failed one in a collective fails too once that one has left)."""
        deadline = time.monotonic() + timeout_s
        replies: dict[int, tuple[str, Any]] = {}
        ready: set[int] = set()
        while len(ready) < len(self.workers):
            pending = {rank: worker for rank, worker in enumerate(self.workers) if rank not in ready}
            handles = [w.conn for w in pending.values()] + [w.process.sentinel for w in pending.values()]
            signalled = wait(handles, timeout=max(deadline - time.monotonic(), 0.0))
            if not signalled:
                break
            for rank, worker in pending.items():
                if worker.conn.poll():
                    status, value = _receive(rank, worker)
                elif worker.process.sentinel in signalled:
                    status, value = "exited", _exited(rank, worker.process)
                else:
                    continue
                if status == "exited":
                    replies.setdefault(rank, (status, value))
                    return replies, ready  # the pool is replaced: no need to hear from the others
                if status != "ready":
                    replies[rank] = (status, value)
                if status == "error":
                    deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
                else:
                    ready.add(rank)
        return replies, ready

    def close(self, kill: bool = False) -> None:
        """Stop the workers: politely (``b""``, then a join), or at once with ``kill``."""
        for worker in self.workers:
            if not kill:
                try:
                    worker.conn.send_bytes(b"")
                except OSError:
                    pass
        for worker in self.workers:
            if not kill:
                worker.process.join(10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(10)
            worker.conn.close()


def _receive(rank: int, worker: _Worker) -> tuple[str, Any]:
    """A worker's answer: ``("ok", result)``, ``("error", ProcessRaisedException)`` or ``("exited", ...)``."""
    try:
        status, value = _loads(worker.conn.recv_bytes())
    except (EOFError, OSError):  # the worker died (its end of the pipe closed)
        return "exited", _exited(rank, worker.process)
    if status == "error":
        value = ProcessRaisedException(f"\n\n-- Process {rank} terminated with the following error:\n{value}", rank,
                                       worker.process.pid)
    return status, value


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _exited(rank: int, process: BaseProcess) -> ProcessExitedException:
    process.join(5)
    code = process.exitcode
    signal_name = signal.Signals(-code).name if code is not None and code < 0 else ""
    return ProcessExitedException(f"process {rank} terminated with exit code {code} {signal_name}".rstrip(),
                                  rank, process.pid, code if code is not None else -1, signal_name)


_POOLS: dict[int, _Pool] = {}


def _pool(world_size: int) -> _Pool:
    """The pool of ``world_size`` workers, started (again) if it is not running."""
    pool = _POOLS.get(world_size)
    if pool is not None and not pool.alive():
        _POOLS.pop(world_size).close(kill=True)
        pool = None
    if pool is None:
        pool = _POOLS[world_size] = _Pool(world_size)
    return pool


def shutdown_pools() -> None:
    """End every worker process (the end of the test session)."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()


atexit.register(shutdown_pools)


def _request(fn: Callable[..., Any], world_size: int, args: tuple, timeout_s: float) -> bytes:
    """A call as the workers receive it, with this process's paths and environment and a new rendezvous."""
    return pickle.dumps(_Call(list(sys.path), dict(os.environ), os.getcwd(), f"tcp://127.0.0.1:{_free_port()}",
                              world_size, timeout_s, _dumps((fn, args))))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, args: tuple = (), *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return the results by rank.

    ``fn`` must be importable (defined at module level). ``fn``, ``args`` and the results go through
    ``torch.save``. An exception on any rank raises ``ProcessRaisedException`` with that rank's traceback;
    a worker that dies raises ``ProcessExitedException``; a call that takes more than ``timeout`` seconds
    raises ``TimeoutError``. The worker processes are restarted after any of these.
    """
    request = _request(fn, world_size, tuple(args), timeout)  # fails here, not in the pool, if not picklable
    pool = _pool(world_size)
    try:
        return pool.call(fn, request, timeout)
    except BaseException:
        if pool.broken:
            _POOLS.pop(world_size, None)
            pool.close(kill=True)
        raise
