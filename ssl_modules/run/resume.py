"""Exact, pre-emption-safe resume (``docs/resume.md``).

- ``ExactResume`` (a Callback every ``SSLModule`` adds through ``configure_callbacks``): saves the RNG
  states of every process in the checkpoint (``torch`` CPU and CUDA, ``numpy``, ``random``; gathered from
  all ranks, each rank restores its own right before its first resumed step), and turns a graceful stop in
  the middle of an epoch (``trainer.should_stop``: ``max_time``; SIGTERM or SLURM's SIGUSR1 requeue,
  agreed by all ranks through ``preemption.StopSignals`` so every rank stops after the same batch) into a
  mid-epoch checkpoint that resumes the rest of that epoch (``hpc_ckpt_N.ckpt`` plus ``scontrol requeue``
  for the SLURM signal). Checkpoints written on the way out after such a stop (ModelCheckpoint's epoch-end
  save) hold that same mid-epoch state, so none supersedes it.
- ``resolve_last_checkpoint``: the newest checkpoint of a run's own folders, for ``fit --ckpt_path last``.
- ``checkpoint_class`` / ``check_checkpoint_class``: a checkpoint of another method class fails before
  training, naming both.
- ``hparam_differences``: what a command line changes against a checkpoint's hyper-parameters.
"""
from __future__ import annotations

import copy
import importlib
import random
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info

from ssl_modules.run.preemption import StopSignals, requeue_slurm_job, signal_name

__all__ = [
    "RNG_KEY",
    "STOP_CHECKPOINT_NAME",
    "ExactResume",
    "check_checkpoint_class",
    "checkpoint_class",
    "checkpoint_dirpaths",
    "hparam_differences",
    "logs_folder",
    "prepare_resume",
    "resolve_last_checkpoint",
    "run_checkpoint_folders",
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
    """A copy of ``checkpoint`` that later training cannot change, held in host memory: every tensor becomes a
    detached copy in CPU memory (a tensor that appears twice is copied once), containers are rebuilt with the
    same types and nesting, and other values are deep copies. A stop at peak GPU memory needs no device memory
    for it (``copy.deepcopy`` would clone weights, optimizer moments and CrIBo's bank on the device)."""
    copies: dict[int, torch.Tensor] = {}

    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
        return copies[id(tensor)]

    return _rebuild(checkpoint, to_host)


def _reused_copy(frozen: dict[str, Any]) -> dict[str, Any]:
    """``frozen`` (a :func:`_detached_copy`) with fresh containers around the same host tensors: a later save may
    add or replace entries of what it gets without changing ``frozen``, and no tensor is copied again."""
    return _rebuild(frozen, lambda tensor: tensor)


def _rebuild(value: Any, on_tensor: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with every tensor replaced by ``on_tensor(tensor)``, dicts, lists and tuples (named ones
    included) rebuilt with their types, and any other value deep-copied."""
    if isinstance(value, torch.Tensor):
        return on_tensor(value)
    if isinstance(value, dict):  # dict, OrderedDict, Lightning's AttributeDict, ...
        rebuilt = copy.copy(value)
        for key, item in value.items():
            rebuilt[key] = _rebuild(item, on_tensor)
        return rebuilt
    if isinstance(value, list):
        return [_rebuild(item, on_tensor) for item in value]
    if isinstance(value, tuple):
        items = [_rebuild(item, on_tensor) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return copy.deepcopy(value)


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
            # the epoch is complete: ModelCheckpoint's epoch-end save runs as usual (the optional parts and
            # ContrastiveCrop's boxes do not: optional_parts.stopped_early), and a signal's checkpoint is
            # written once training has ended
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
            return _reused_copy(frozen)  # the host copy of the stop, not a new copy (nor one on the device)

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
def run_checkpoint_folders(root: str | Path, dirpaths: Sequence[str | Path] = (),
                           logs: str | Path | None = None) -> list[Path]:
    """The folders where a run with ``default_root_dir`` ``root`` writes its checkpoints: the checkpoint
    callbacks' ``dirpaths`` when the config sets them; else ``root/checkpoints`` (no logger, or no checkpoint
    callback: where the stop checkpoint goes) and the ``checkpoints`` folder of the newest ``version_N`` under
    ``logs`` (default ``root/lightning_logs``) that has any. Never other sub-folders: another run's
    checkpoints are not this run's."""
    if dirpaths:
        return [Path(folder) for folder in dirpaths]
    root = Path(root)
    folders = [root / "checkpoints"]
    version = _newest_version_with_checkpoints(Path(logs) if logs is not None else root / "lightning_logs")
    if version is not None:
        folders.append(version / "checkpoints")
    return folders


def _newest_version_with_checkpoints(logs: Path) -> Path | None:
    """The ``version_N`` folder under ``logs`` with the highest N among those with a ``checkpoints/*.ckpt``."""
    versions = []
    for folder in logs.glob("version_*"):
        number = folder.name.removeprefix("version_")
        if number.isdigit() and any(path.is_file() for path in (folder / "checkpoints").glob("*.ckpt")):
            versions.append((int(number), folder))
    return max(versions)[1] if versions else None


def resolve_last_checkpoint(root: str | Path, dirpaths: Sequence[str | Path] = (),
                            logs: str | Path | None = None) -> Path | None:
    """The newest ``.ckpt`` (by modification time) of the run whose ``default_root_dir`` is ``root``: in its
    :func:`run_checkpoint_folders` and Lightning's SLURM ``root/hpc_ckpt_*.ckpt``; None when there is none."""
    root = Path(root)
    candidates = [path for folder in run_checkpoint_folders(root, dirpaths, logs) for path in folder.glob("*.ckpt")]
    candidates += list(root.glob("hpc_ckpt_*.ckpt"))
    from ssl_modules.checkpoints.reading import is_distributed_checkpoint

    candidates = [path for path in candidates if path.is_file() or is_distributed_checkpoint(path)]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns) if candidates else None


def _config_value(config: Any, key: str) -> Any:
    """``config[key]`` of a jsonargparse Namespace or dict (None when absent), or the attribute of an object."""
    if config is None:
        return None
    if hasattr(config, "get"):
        return config.get(key)
    return getattr(config, key, None)


def _is_model_checkpoint(class_path: str) -> bool:
    """Whether a config's ``class_path`` names ``ModelCheckpoint`` or a subclass of it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    try:
        cls = _import_class(class_path)
    except Exception:  # a user's module that fails to import: judge by the name (Lightning reports the error)
        cls = None
    if isinstance(cls, type):
        return issubclass(cls, ModelCheckpoint)
    return class_path.rpartition(".")[2] == "ModelCheckpoint"


def checkpoint_dirpaths(trainer: Any) -> list[str]:
    """The ``dirpath`` of every ``ModelCheckpoint`` that a ``trainer`` config section sets one for."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = _config_value(trainer, "callbacks") or []
    if not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    found = []
    for entry in callbacks:
        if isinstance(entry, ModelCheckpoint):
            dirpath = entry.dirpath
        else:
            class_path = _config_value(entry, "class_path")
            is_checkpoint = isinstance(class_path, str) and _is_model_checkpoint(class_path)
            dirpath = _config_value(_config_value(entry, "init_args"), "dirpath") if is_checkpoint else None
        if dirpath:
            found.append(str(dirpath))
    return found


def logs_folder(trainer: Any, root: str | Path) -> Path:
    """Where a ``trainer`` config section's (first) logger puts its ``version_N`` folders: ``save_dir/name``
    of a logger given with ``init_args`` (TensorBoardLogger, CSVLogger), else ``root/lightning_logs``."""
    logger = _config_value(trainer, "logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    init_args = None if isinstance(logger, bool) else _config_value(logger, "init_args")
    if init_args is None:
        return Path(root) / "lightning_logs"
    save_dir = Path(_config_value(init_args, "save_dir") or root)
    given = hasattr(init_args, "__contains__") and "name" in init_args  # name=None: no folder of its own
    name = _config_value(init_args, "name") if given else "lightning_logs"
    return save_dir / str(name) if name else save_dir


def checkpoint_class(checkpoint: Mapping[str, Any]) -> str | None:
    """The dotted class name of the ``SSLModule`` that wrote ``checkpoint``, or None."""
    return checkpoint.get("ssl_module_class")


def check_checkpoint_class(checkpoint: Mapping[str, Any], model_class: type, path: str | Path) -> None:
    """A ``ValueError`` naming both classes unless ``checkpoint`` was written by ``model_class``."""
    from ssl_modules.checkpoints.reading import class_path, importable_class

    written_by = checkpoint_class(checkpoint)
    wanted = class_path(model_class)
    if written_by is not None and written_by != wanted and importable_class(written_by) is not model_class:
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
    """The checkpoint's entries (memory-mapped: the tensors are not read), read weights-only by the library's
    one reader (``checkpoint_io.read_checkpoint``), or an error naming the file. A run resumes only from a
    checkpoint that loads weights-only, as Lightning itself then reads it (``docs/resume.md``)."""
    from ssl_modules.checkpoints.reading import CheckpointFileError, UntrustedCheckpointError, read_checkpoint

    try:
        return read_checkpoint(path, mmap=True, label=f"--ckpt_path {path}")
    except UntrustedCheckpointError as error:
        raise CheckpointFileError(
            f"--ckpt_path {path} holds {', '.join(error.refused)}, which a weights-only read refuses (unpickling it "
            "could run code from the file), and Lightning reads --ckpt_path weights-only too: resume from a "
            "checkpoint written by this library's runs, which holds no such types") from None


def _resolve_last(trainer: Any) -> tuple[Path | None, str]:
    """``--ckpt_path last`` of a ``trainer`` config section: the newest checkpoint of the run's own folders
    (:func:`resolve_last_checkpoint`), and the line that tells the user which one, or that there is none."""
    root = Path(_config_value(trainer, "default_root_dir") or Path.cwd())
    dirpaths = checkpoint_dirpaths(trainer)
    logs = logs_folder(trainer, root)
    found = resolve_last_checkpoint(root, dirpaths, logs)
    if found is not None:
        return found, f"--ckpt_path last: resuming {found} (the newest checkpoint of this run's folders)"
    searched = run_checkpoint_folders(root, dirpaths, logs)
    if not dirpaths:
        searched.append(logs / "version_*" / "checkpoints")
    where = ", ".join(str(folder) for folder in [*searched, root / "hpc_ckpt_*.ckpt"])
    return None, f"--ckpt_path last: no checkpoint under {root} (looked in {where}); starting a new run"


def prepare_resume(section: Any, config_dir: str | Path | None = None) -> list[str]:
    """Check and complete the ``fit`` config ``section`` (a jsonargparse Namespace) for its ``ckpt_path``.

    - ``ckpt_path: last`` becomes the newest checkpoint of the run's own folders (the checkpoint callbacks'
      ``dirpath`` when the config sets one, else ``checkpoints/`` and the newest ``lightning_logs/version_N/
      checkpoints/`` under ``trainer.default_root_dir`` or the current folder, plus SLURM's ``hpc_ckpt_N.ckpt``;
      never other sub-folders), named in the returned lines, or None (a fresh start, said there too);
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
        found, line = _resolve_last(section.get("trainer"))
        lines.append(line)
        if found is None:
            section["ckpt_path"] = None
            return lines
        section["ckpt_path"] = ckpt_path = str(found)
    path = Path(ckpt_path)
    from ssl_modules.checkpoints.reading import is_distributed_checkpoint

    if not path.is_file() and not is_distributed_checkpoint(path):  # a file, or an FSDP2 checkpoint folder
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
