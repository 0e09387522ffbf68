"""Stop signals (SIGTERM, SLURM's requeue signal) turned into a stop at a batch boundary, on every process.

Lightning's own handling does not give a mid-epoch checkpoint on a batch boundary: under DDP its SIGTERM
handler issues a collective from inside the signal handler and the run ends with ``SIGTERMException``
before the next batch, and its SLURM requeue handler writes ``hpc_ckpt_N.ckpt`` wherever in a step the
signal arrives. :class:`StopSignals` replaces both handlers for the training loop with ones that only
record the signal; :meth:`StopSignals.agreed` is then called at the end of every training batch by every
process and returns the same answer on all of them, so that the stop (and the checkpoint it writes, a
collective) happens at the same batch everywhere. ``docs/resume.md`` says how to use it on SLURM.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["StopSignals", "requeue_slurm_job", "signal_name", "slurm_requeue_signal"]

_Handler = Callable[[int, FrameType | None], Any] | int | None


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, ..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def slurm_requeue_signal(trainer: Any) -> int | None:
    """The signal on which Lightning's SLURM environment requeues the job (SIGUSR1 unless configured), or
    None when the run is not under SLURM with ``auto_requeue``."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
        return None
    return int(environment.requeue_signal or signal.SIGUSR1)


class StopSignals:
    """Record stop signals during training and decide collectively, at batch ends, whether to stop.

    Under DDP the decision is one batch late: at the end of batch ``t`` every process starts an
    asynchronous all-reduce (maximum, over a CPU ``gloo`` group, so that no step waits on it or
    synchronises the GPU) of the signal it has received, and reads the all-reduce started at batch
    ``t - 1``. Every process therefore stops after the same batch.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.requeue_signal: int | None = None
        self._previous: dict[int, _Handler] = {}
        self._group: Any = None
        self._own_group = False
        self._vote: tuple[Any, torch.Tensor] | None = None

    # -- handlers -----------------------------------------------------------------------------------------
    def install(self, trainer: Any) -> None:
        """Take over SIGTERM and the SLURM requeue signal (when requeueing is on) for the training loop."""
        self.received = None
        self.requeue_signal = slurm_requeue_signal(trainer)
        if threading.current_thread() is not threading.main_thread() or os.name == "nt":
            return  # Python only delivers signals to the main thread; Windows lacks SIGUSR1
        for signum in filter(None, (int(signal.SIGTERM), self.requeue_signal)):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._record)
        if _distributed(trainer):
            self._group, self._own_group = _cpu_group()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None or signum == self.requeue_signal:
            self.received = signum  # a requeue request wins over a plain SIGTERM: the job comes back
        rank_zero_info(f"Received {signal_name(signum)}: stopping at the end of this batch with a checkpoint")

    def uninstall(self) -> None:
        """Give the signals back to the handlers they had before ``install``; finish a pending vote."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        if self._vote is not None:
            self._vote[0].wait()
            self._vote = None
        if self._own_group:
            dist.destroy_process_group(self._group)
        self._group, self._own_group = None, False

    # -- the decision -------------------------------------------------------------------------------------
    def agreed(self, trainer: Any) -> int | None:
        """The signal every process agrees to stop on after this batch, or None (call it on every rank)."""
        if not _distributed(trainer):
            return self.received
        decided = 0
        if self._vote is not None:
            work, votes = self._vote
            work.wait()
            decided = int(votes.item())
        votes = torch.tensor([self.received or 0], dtype=torch.int64, device=_vote_device(self._group))
        work = dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._vote = (work, votes)
        return decided or None


def _distributed(trainer: Any) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def _cpu_group() -> tuple[Any, bool]:
    """A gloo group for the CPU vote (``(None, False)``: the default group when it is gloo already)."""
    if dist.get_backend() == "gloo":
        return None, False
    try:
        return dist.new_group(backend="gloo"), True
    except Exception as error:  # a cluster where gloo cannot connect: vote on the default group
        rank_zero_warn(f"StopSignals: no gloo group ({error}); the stop vote uses the default process group")
        return None, False


def _vote_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "gloo":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def requeue_slurm_job() -> bool:
    """``scontrol requeue`` this SLURM job (array-aware); True when it was requeued."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if not job:
        rank_zero_warn("SLURM requeue: SLURM_JOB_ID is not set; the job was not requeued")
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        rank_zero_warn(f"SLURM requeue: scontrol was not found; requeue job {job} by hand")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"SLURM requeue of job {job} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    rank_zero_info(f"Requeued SLURM job {job}")
    return True
