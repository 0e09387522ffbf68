"""Exact, pre-emption-safe resume (``docs/resume.md``).

- ``ExactResume`` (a Callback every ``SSLModule`` adds through ``configure_callbacks``): saves the RNG
  states of every process in the checkpoint (``torch`` CPU and CUDA, ``numpy``, ``random``; gathered from
  all ranks, each rank restores its own right before its first resumed step), and turns a graceful stop in
  the middle of an epoch (``trainer.should_stop``: ``max_time``; SIGTERM or SLURM's SIGUSR1 requeue,
  agreed by all ranks through ``preemption.StopSignals`` so every rank stops after the same batch) into a
  mid-epoch checkpoint that resumes the rest of that epoch (``hpc_ckpt_N.ckpt`` plus ``scontrol requeue``
  for the SLURM signal). Checkpoints written on the way out after such a stop (ModelCheckpoint's epoch-end
  save) hold that same mid-epoch state, so none supersedes it.
- ``resolve_last_checkpoint``: the newest checkpoint of a run's folder, for ``fit --ckpt_path last``.
- ``checkpoint_class`` / ``check_checkpoint_class``: a checkpoint of another method class fails before
  training, naming both.
- ``hparam_differences``: what a command line changes against a checkpoint's hyper-parameters.
"""
from __future__ import annotations

import copy
import importlib
import random
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info

from .preemption import StopSignals, requeue_slurm_job, signal_name

__all__ = [
    "RNG_KEY",
    "STOP_CHECKPOINT_NAME",
    "ExactResume",
    "check_checkpoint_class",
    "checkpoint_class",
    "hparam_differences",
    "prepare_resume",
    "resolve_last_checkpoint",
    "rng_state",
    "set_rng_state",
]

RNG_KEY = "rng_states"
STOP_CHECKPOINT_NAME = "last-stop.ckpt"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, every CUDA device, numpy's global, Python's ``random``."""
    # plain tensors, ints and tuples only: checkpoints must load with torch.load(weights_only=True)
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"].cpu())
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _gather_objects(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order (a collective under DDP: every rank saves checkpoints)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _detached_copy(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A deep copy whose tensors are CPU clones: later training cannot change it."""
    return copy.deepcopy(checkpoint)


class ExactResume(pl.Callback):
    """RNG states per rank in every checkpoint, and mid-epoch checkpoints on graceful stops.

    The RNG states are the ones at the moment of saving; restored right before the first training batch
    of the resumed run, so the step randomness (drop-path, CrIBo's initial centroids) continues as if the
    run had not stopped. The data order and views need no RNG state: they are pure functions of the seed,
    the epoch and the index (``datamodules.ResumableSampler``).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None  # this rank's RNG state, restored at the first batch
        self._stop_checkpoint: dict[str, Any] | None = None
        self._signals = StopSignals()
        self._save_at_train_end = False
        self.stopped_by: str | None = None  # why training stopped before its end: "SIGTERM", "should_stop", ...
        self.stop_signal: int | None = None  # the signal it stopped on, if any
        self.stop_path: Path | None = None  # the checkpoint written for that stop

    @property
    def state_key(self) -> str:  # one per trainer, whatever its arguments
        return "ExactResume"

    # -- RNG states ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = _gather_objects(rng_state())

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # max_time is a budget per job: Lightning's Timer would restore the stopped job's elapsed time and
        # stop the resumed one after its first batch (the pre-emption use of max_time needs a fresh budget)
        for callback in trainer.callbacks:
            if isinstance(callback, Timer):
                checkpoint.get("callbacks", {}).pop(callback.state_key, None)
        states = checkpoint.get(RNG_KEY)
        if not states:
            return
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            rank_zero_info(f"ExactResume: the checkpoint holds the RNG states of {len(states)} process(es), this run "
                           f"has {trainer.world_size}: the step randomness restarts from rank {rank % len(states)}'s")
        self._pending = states[rank % len(states)]

    @staticmethod
    def _run_missed_epoch_start_hooks(trainer: pl.Trainer) -> None:
        if _resumed_after_last_batch(trainer):
            # Lightning restores a checkpoint written at the end of an epoch's last batch (a step checkpoint
            # that falls on the epoch end) as "restarted mid-epoch": it counts the epoch done and starts the
            # next one without its on_train_epoch_start hooks. Call them, as the uninterrupted run did.
            from lightning.pytorch.trainer import call

            call._call_callback_hooks(trainer, "on_train_epoch_start")
            call._call_lightning_module_hook(trainer, "on_train_epoch_start")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            set_rng_state(self._pending)
            self._pending = None

    # -- graceful stops -----------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signum = self._signals.agreed(trainer)  # a collective under DDP: every rank, every batch
        if trainer.sanity_checking or self.stopped_by is not None:
            return
        if signum is None and not trainer.should_stop:
            return
        self.stopped_by = signal_name(signum) if signum is not None else "should_stop"
        self.stop_signal = signum
        trainer.should_stop = True
        if batch_idx + 1 >= trainer.num_training_batches:
            # the epoch is complete: its end-of-epoch work (ContrastiveCrop's boxes, ModelCheckpoint) runs as
            # usual, and a signal's checkpoint is written once training has ended
            self._save_at_train_end = signum is not None
            return
        self._stop_checkpoint = _detached_copy(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))
        self._freeze_later_checkpoints(trainer)
        self._save_stop_checkpoint(trainer, f"in the middle of epoch {trainer.current_epoch}",
                                   "to run the rest of the epoch")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stopped_by = self.stop_signal = self.stop_path = None
        self._save_at_train_end = False
        self._signals.install(trainer)
        self._run_missed_epoch_start_hooks(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._signals.uninstall()
        if self._save_at_train_end:
            self._save_stop_checkpoint(trainer, f"at the end of epoch {trainer.current_epoch - 1}",
                                       "to run the next epochs")

    def _save_stop_checkpoint(self, trainer: pl.Trainer, where: str, what: str) -> None:
        requeue = self.stop_signal is not None and self.stop_signal == self._signals.requeue_signal
        path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)) if requeue \
            else self._stop_path(trainer)
        trainer.save_checkpoint(path)
        self.stop_path = path
        rank_zero_info(f"Stopped {where} (step {trainer.global_step}, {self.stopped_by}): saved {path}; resume "
                       f"with --ckpt_path {path} (or last) {what}")
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()  # the requeued job resumes hpc_ckpt_N.ckpt by itself (Lightning's SLURM rule)

    def _freeze_later_checkpoints(self, trainer: pl.Trainer) -> None:
        """Every checkpoint written for the rest of this fit (ModelCheckpoint's epoch-end save on the way
        out) holds the mid-epoch state, so that resuming from any of them runs the rest of the epoch."""
        connector = trainer._checkpoint_connector
        frozen = self._stop_checkpoint

        def dump_checkpoint(self: Any, weights_only: bool | None = False) -> dict[str, Any]:
            return _detached_copy(frozen)

        connector.dump_checkpoint = types.MethodType(dump_checkpoint, connector)

    @staticmethod
    def _stop_path(trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / STOP_CHECKPOINT_NAME

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._signals.uninstall()
        if self._stop_checkpoint is not None:
            trainer._checkpoint_connector.__dict__.pop("dump_checkpoint", None)
            self._stop_checkpoint = None


def _resumed_after_last_batch(trainer: pl.Trainer) -> bool:
    """Whether this fit resumes from a checkpoint written at the end of an epoch's last training batch."""
    fit_loop = trainer.fit_loop
    progress = fit_loop.epoch_loop.batch_progress
    return bool(fit_loop.restarted_mid_epoch and progress.is_last_batch
                and progress.current.processed >= trainer.num_training_batches)


# ---------------------------------------------------------------------------------------------- the CLI side
def resolve_last_checkpoint(root: str | Path) -> Path | None:
    """The newest ``.ckpt`` (by modification time) under ``root`` (a run's ``default_root_dir``: its
    ``lightning_logs/version_*/checkpoints`` folders included), or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates = [path for path in root.rglob("*.ckpt") if path.is_file()]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns) if candidates else None


def checkpoint_class(checkpoint: Mapping[str, Any]) -> str | None:
    """The dotted class name of the ``SSLModule`` that wrote ``checkpoint``, or None."""
    return checkpoint.get("ssl_module_class")


def check_checkpoint_class(checkpoint: Mapping[str, Any], model_class: type, path: str | Path) -> None:
    """A ``ValueError`` naming both classes unless ``checkpoint`` was written by ``model_class``."""
    written_by = checkpoint_class(checkpoint)
    wanted = f"{model_class.__module__}.{model_class.__qualname__}"
    if written_by is not None and written_by != wanted:
        raise ValueError(
            f"--ckpt_path {path} was written by {written_by}, but this run's model is {wanted}: resume with the "
            f"config of the run that wrote it (model.class_path: {written_by}), or start a new run without ckpt_path")


def hparam_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (checkpoint value, given value)}`` for the hyper-parameters both have and that differ."""
    differences = {}
    for name, value in given.items():
        if name in saved and _plain(saved[name]) != _plain(value):
            differences[name] = (saved[name], value)
    return differences


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (YAML gives lists where Python gave tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _import_class(class_path: str) -> type | None:
    """The class of a config's ``class_path`` (dotted, or a short name of ``ssl_modules``), or None."""
    module_name, _, name = class_path.rpartition(".")
    module_name = module_name or "ssl_modules"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:  # the user's module is not importable here; its own failures propagate
        if error.name is not None and module_name.startswith(error.name):
            return None
        raise
    return getattr(module, name, None)


def _read_for_resume(path: Path) -> dict[str, Any]:
    """The checkpoint's entries (memory-mapped: the tensors are not read), or an error naming the file."""
    from .checkpoint_io import CheckpointFileError, check_checkpoint_file

    check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch raises EOFError, UnpicklingError, RuntimeError, IndexError, ...
        raise CheckpointFileError(
            f"--ckpt_path {path} could not be read ({type(error).__name__}: {error}): expected a .ckpt file written "
            "by a Lightning Trainer; the file is probably damaged, use an earlier checkpoint") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointFileError(f"--ckpt_path {path} holds no 'state_dict' entry: expected a .ckpt file written "
                                  "by a Lightning Trainer")
    return checkpoint


def prepare_resume(section: Any, config_dir: str | Path | None = None) -> list[str]:
    """Check and complete the ``fit`` config ``section`` (a jsonargparse Namespace) for its ``ckpt_path``.

    - ``ckpt_path: last`` becomes the newest checkpoint under ``trainer.default_root_dir`` (the current
      folder when unset), or None (a fresh start, said in the returned lines) when there is none;
    - a checkpoint written by another method class than ``model.class_path`` raises a ``ValueError``
      naming both, before anything is built;
    - the model's hyper-parameters are those of the config and command line: the ones that differ from
      the checkpoint's are applied and listed in the returned lines (``docs/resume.md``).
    """
    ckpt_path = section.get("ckpt_path")
    if not ckpt_path:
        return []
    lines: list[str] = []
    if ckpt_path == "last":
        root = (section.get("trainer") or {}).get("default_root_dir") or Path.cwd()
        found = resolve_last_checkpoint(root)
        if found is None:
            section["ckpt_path"] = None
            return [f"--ckpt_path last: no checkpoint under {root}; starting a new run"]
        section["ckpt_path"] = ckpt_path = str(found)
        lines.append(f"--ckpt_path last: resuming {found}")
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {path} does not exist; give a .ckpt file, or 'last' for the newest "
                                "checkpoint of the run")
    checkpoint = _read_for_resume(path)
    model = section.get("model")
    class_path = model.get("class_path") if model is not None else None
    model_class = _import_class(class_path) if class_path else None
    if model_class is not None:
        check_checkpoint_class(checkpoint, model_class, path)
        given = model.get("init_args")
        given = given.as_dict() if hasattr(given, "as_dict") else dict(given or {})
        saved = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        differences = hparam_differences(saved, given)
        if differences:
            lines.append(f"hyper-parameters that differ from {path.name}'s (the config's values are applied):")
            lines += [f"  {name}: {old!r} -> {new!r}{' (the default, resolved by the module)' if new is None else ''}"
                      for name, (old, new) in sorted(differences.items())]
    return lines
