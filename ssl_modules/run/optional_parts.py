"""Optional parts of a run (probes, pictures): they never change training, never hang it, never outlive a stop.

- :func:`isolated_rng`: the body may draw from the global random generators (torch on the CPU and on the
  current CUDA device, numpy, Python's ``random``); when it ends they are where they were, so a probe or a
  picture leaves training's random streams untouched, and a run with them equals the run without them.
- :func:`agreed_failure`: under DDP an exception in the body on *any* process becomes a
  :class:`PartFailedError` on *every* process, together, naming the failing rank(s) and their exceptions, so
  that no process is left waiting in a collective of the failed part. Every collective of
  ``ssl_modules.run.distributed`` called inside the body first asks the processes whether one of them has
  failed (a vote: one small all-reduce on a CPU group), and the body's end is a last vote. A failure
  *inside* a collective (a process that dies or hangs in it) cannot be voted on: the other processes wait
  until the process group's timeout (``DDPStrategy(timeout=...)``, 30 minutes by default), and the run then
  fails with the collective's error instead of hanging for ever (``docs/failures.md``).
- :func:`stopped_early`: whether training is stopping before its planned end (a signal or ``max_time``),
  after which nothing optional runs.

Torch only (:func:`stopped_early` reads the trainer's ``ExactResume`` callback by its state key).
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["PartFailedError", "agreed_failure", "before_collective", "isolated_rng", "stopped_early"]


# ------------------------------------------------------------------------------------------------ randomness
@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run the body on the global RNGs and put them back afterwards (torch CPU and the current CUDA device,
    numpy, ``random``): whatever the body draws, the code after it draws what it would have drawn."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


# ----------------------------------------------------------------------------------------- agreed failures
class PartFailedError(RuntimeError):
    """An optional part failed on one or more processes; raised on every process together.

    ``failures`` maps each failing rank to its exception, as ``"TypeName: message"``.
    """

    def __init__(self, part: str, failures: dict[int, str]) -> None:
        self.part, self.failures = part, dict(failures)
        where = "; ".join(f"on rank {rank}: {message}" for rank, message in sorted(self.failures.items()))
        super().__init__(f"{part} failed {where or 'on another process'}")


_active: list[str] = []  # the optional part running now (one at most: nested uses belong to the outer one)
_vote_groups: dict[int, Any] = {}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _vote_group() -> Any:
    """A CPU (gloo) group for the votes: votes then never synchronise a GPU. The default group when it is
    gloo already; created once per default group otherwise (every process votes in the same order, so the
    creation, itself collective, happens at the same vote everywhere)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _vote_groups:
        try:
            _vote_groups[key] = dist.new_group(backend="gloo")
        except Exception:  # noqa: BLE001  (a cluster where gloo cannot connect: vote on the default group)
            _vote_groups[key] = None
    return _vote_groups[key]


def _vote(failed: bool) -> bool:
    """Whether any process voted ``failed`` (a MAX all-reduce of one integer)."""
    group = _vote_group()
    on_cpu = group is not None or dist.get_backend() == "gloo"
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _exchange(message: str | None) -> dict[int, str]:
    """Every process's failure message (None where it did not fail), as ``{rank: message}``."""
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message, group=_vote_group())
    return {rank: text for rank, text in enumerate(messages) if text is not None}


def before_collective() -> None:
    """Inside :func:`agreed_failure` under DDP: vote before a collective, and raise
    :class:`PartFailedError` on every process if a process has failed (``ssl_modules.run.distributed`` calls it)."""
    if not _active or not _distributed():
        return
    if _vote(False):
        raise PartFailedError(_active[-1], _exchange(None))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def agreed_failure(part: str) -> Iterator[None]:
    """Run the body as ``part``: an exception on any process raises :class:`PartFailedError` on all of them.

    Nested uses belong to the outermost one (its votes cover the body). An error of the process group
    itself (``torch.distributed.DistError``: a timeout, a dead peer) is not voted on: it propagates.
    """
    if _active:
        yield
        return
    _active.append(part)
    try:
        yield
    except (PartFailedError, dist.DistError):
        raise
    except Exception as error:
        if not _distributed():
            raise PartFailedError(part, {0: _describe(error)}) from error
        _vote(True)
        raise PartFailedError(part, _exchange(_describe(error))) from error
    finally:
        _active.pop()
    if _distributed() and _vote(False):
        raise PartFailedError(part, _exchange(None))


# ------------------------------------------------------------------------------------------------- stops
def stopped_early(trainer: Any) -> str | None:
    """Why training is stopping before its planned end (``"SIGTERM"``, ``"SIGUSR1"``, ``"should_stop"`` for
    ``max_time`` or a stop request), as the run's ``ExactResume`` decided it on every process; else None."""
    for callback in getattr(trainer, "callbacks", []):  # found by its state key: no import of the run machinery
        if getattr(callback, "state_key", None) == "ExactResume" and callback.stopped_by is not None:
            return callback.stopped_by
    return None
