"""``fit --ckpt_path last`` searches only the run's own folders and says which checkpoint it picked (issue 26,
point 7). The former search took the newest ``.ckpt`` anywhere under ``default_root_dir``, or under the current
folder when the config sets none, so it could resume another run of the same method."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from jsonargparse import Namespace

from ssl_modules.run.resume import prepare_resume, resolve_last_checkpoint


def _checkpoint(path: Path, age: int) -> Path:
    """A minimal Lightning-like checkpoint at ``path``, modified ``age`` seconds before a fixed time (0: newest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "global_step": 0}, path)
    os.utime(path, (2_000_000 - age, 2_000_000 - age))
    return path


def _fit_section(**trainer) -> Namespace:
    """The ``fit`` section of a parsed config (jsonargparse), as ``SSLCLI`` gives ``prepare_resume``."""
    return Namespace(ckpt_path="last", model=None, trainer=Namespace(**trainer))


def _model_checkpoint(dirpath: Path) -> Namespace:
    return Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint",
                     init_args=Namespace(dirpath=str(dirpath), every_n_train_steps=2))


def test_without_default_root_dir_a_stray_checkpoint_under_the_current_folder_is_not_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = _checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt", age=100)
    _checkpoint(tmp_path / "other_run" / "lightning_logs" / "version_3" / "checkpoints" / "epoch=9.ckpt", age=0)
    _checkpoint(tmp_path / "lightning_logs" / "version_0" / "copies" / "backup.ckpt", age=0)
    section = _fit_section(default_root_dir=None)
    lines = prepare_resume(section)
    assert section["ckpt_path"] == str(own)
    assert lines[0].startswith(f"--ckpt_path last: resuming {own}")


def test_the_checkpoint_callbacks_dirpath_is_the_only_folder_searched(tmp_path):
    folder = tmp_path / "ckpts"
    own = _checkpoint(folder / "step=4.ckpt", age=100)
    _checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=3-step=8.ckpt", age=0)
    _checkpoint(tmp_path / "checkpoints" / "last-stop.ckpt", age=0)
    section = _fit_section(default_root_dir=str(tmp_path), callbacks=[_model_checkpoint(folder)])
    lines = prepare_resume(section)
    assert section["ckpt_path"] == str(own) and str(own) in lines[0]


def test_the_newest_version_folder_with_checkpoints_and_the_slurm_checkpoint_are_the_runs(tmp_path):
    _checkpoint(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt", age=300)
    newest_version = _checkpoint(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last-stop.ckpt", 200)
    (tmp_path / "lightning_logs" / "version_2").mkdir()  # a run that failed before its first checkpoint
    assert resolve_last_checkpoint(tmp_path) == newest_version
    requeued = _checkpoint(tmp_path / "hpc_ckpt_1.ckpt", age=0)
    assert resolve_last_checkpoint(tmp_path) == requeued


def test_a_loggers_own_folder_is_searched(tmp_path):
    """A config's CSVLogger/TensorBoardLogger with ``save_dir`` and ``name`` keeps its version folders there."""
    logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                       init_args=Namespace(save_dir=str(tmp_path / "logs"), name="cribo"))
    own = _checkpoint(tmp_path / "logs" / "cribo" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt", age=0)
    section = _fit_section(default_root_dir=str(tmp_path), logger=logger)
    prepare_resume(section)
    assert section["ckpt_path"] == str(own)


def test_no_checkpoint_of_the_run_starts_a_new_run_and_says_where_it_looked(tmp_path):
    _checkpoint(tmp_path / "elsewhere" / "epoch=0.ckpt", age=0)
    section = _fit_section(default_root_dir=str(tmp_path))
    [line] = prepare_resume(section)
    assert section["ckpt_path"] is None
    assert line.startswith(f"--ckpt_path last: no checkpoint under {tmp_path}")
    assert str(tmp_path / "checkpoints") in line and "lightning_logs" in line and "hpc_ckpt_" in line
