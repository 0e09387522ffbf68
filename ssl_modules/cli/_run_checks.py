"""Checks before a ``fit`` or ``validate`` runs: it trains something, its folders are writable, its processes fit
the cores; and the run folder that a run failing before its first step removes again."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from ssl_modules.cli._errors import CommandLineError, RunError, is_rank_zero

__all__ = ["check_trains_something", "check_writable_folder", "check_run_folders_writable",
           "warn_more_processes_than_cores", "usable_cpus", "FailedRunFolder", "trains_in_this_process"]


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one (Linux), else all of the
    machine's (macOS, Windows); at least 1."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


def check_trains_something(section: Any) -> None:
    """A :class:`CommandLineError` for ``fit`` with ``max_epochs 0`` or ``max_steps 0``: such a run trains
    nothing and would export the random initial backbone as if it were trained."""
    trainer = (section.get("trainer") if section is not None else None) or {}
    for name in ("max_epochs", "max_steps"):
        if trainer.get(name) == 0:
            raise CommandLineError(
                f"error: --trainer.{name} 0 trains nothing: fit would export the random initial backbone as if it "
                f"were trained. Give {name} >= 1 (or -1 with the other limit set); to write a checkpoint's "
                "backbone use: python -m ssl_modules export <ckpt> <out.pt>")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable_folder(folder: str | Path, what: str) -> None:
    """A :class:`RunError` unless ``folder`` can be created (if needed) and written by this process."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise RunError(f"{what} {folder} cannot be created: {existing} is a file, not a folder. Choose another "
                       f"folder for {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        relation = "is" if existing == folder.absolute() else f"would be created in {existing}, which is"
        raise RunError(f"{what} {folder} {relation} not writable by this user (permission denied). Choose a folder "
                       f"you can write to (e.g. {what} runs/<name>), or change its permissions")


def check_run_folders_writable(trainer: Any) -> None:
    """The folders the run will write (``default_root_dir``, the loggers', each ``ModelCheckpoint`` dirpath)
    are writable, checked before anything is built or trained (on every process: each writes its own files)."""
    folders = {str(trainer.default_root_dir): "--trainer.default_root_dir"}
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            folders.setdefault(str(save_dir), f"the save_dir of {type(logger).__name__}")
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            folders.setdefault(str(dirpath), f"the dirpath of {type(callback).__name__}")
    for folder, what in folders.items():
        if "://" not in folder:  # remote file systems (s3://, gs://) are the user's to check
            check_writable_folder(folder, what)


def warn_more_processes_than_cores(trainer: Any) -> None:
    """A warning (stderr, rank zero) when a CPU run starts more processes than this process has cores."""
    from lightning.pytorch.accelerators import CPUAccelerator

    processes, cores = trainer.num_devices, usable_cpus()
    if isinstance(trainer.accelerator, CPUAccelerator) and processes > cores and is_rank_zero():
        print(f"warning: --trainer.devices {processes} starts {processes} training processes on the CPU, but this "
              f"process may use {cores} core{'s' if cores > 1 else ''}: they share the cores and the run is slower "
              f"than with --trainer.devices {cores}. Several CPU processes are for trying DDP code; train on "
              "GPUs (--trainer.accelerator gpu)", file=sys.stderr)


class FailedRunFolder:
    """The folder a ``fit`` writes its logs to, remembered before the run so that a run failing before its first
    step removes it again: only when the run created it and nothing in it is a checkpoint."""

    def __init__(self, folder: Path, existed: bool, anchor: Path) -> None:
        self.folder, self.existed, self.anchor = folder, existed, anchor

    @classmethod
    def plan(cls, trainer: Any) -> FailedRunFolder | None:
        """The run folder of ``trainer`` (no collective call), or None for a logger whose folder is shared."""
        folder = _planned_run_folder(trainer)
        if folder is None:
            return None
        folder = folder.absolute()
        return cls(folder, folder.exists(), _nearest_existing(folder))

    def remove(self) -> bool:
        """Remove the folder (and the empty parents the run created) if the run created it and it holds no
        checkpoint; returns whether it did."""
        import shutil

        if self.existed or not self.folder.is_dir() or any(self.folder.rglob("*.ckpt")):
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        for parent in self.folder.parents:
            if parent == self.anchor or self.anchor not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()
        return not self.folder.exists()


def trains_in_this_process(trainer: Any) -> bool:
    """Whether ``fit`` trains in this process (rank 0 of ``ddp`` does), not in processes it spawns
    (``ddp_spawn``, ``ddp_fork``), whose progress this process never sees."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _planned_run_folder(trainer: Any) -> Path | None:
    """Where ``trainer.log_dir`` will be, computed without its broadcast (the processes are not started yet)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (TensorBoardLogger, CSVLogger)) and "://" not in str(logger.log_dir):
        return Path(logger.log_dir)
    return None
