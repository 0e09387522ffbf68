"""Reading checkpoint files with errors that name the file and what was expected (``docs/failures.md``)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

__all__ = ["CheckpointFileError", "check_checkpoint_file", "read_checkpoint"]

_EXPECTED = "expected a .ckpt file written by a Lightning Trainer (ModelCheckpoint or Trainer.save_checkpoint)"


class CheckpointFileError(ValueError):
    """A checkpoint path that is missing, empty, truncated or not a Lightning checkpoint."""


def check_checkpoint_file(path: str | Path) -> Path:
    """Cheap structural check (no tensors read): the file exists, is not empty and is a complete torch archive.

    A file cut short by an interrupted save or copy loses the archive's directory, which sits at its end, so
    truncation is caught here without unpickling anything.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointFileError(f"checkpoint {path} does not exist: {_EXPECTED}")
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} is a directory, not a file: {_EXPECTED}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"checkpoint {path} is empty (0 bytes): {_EXPECTED}; use an earlier checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"checkpoint {path} ({size} bytes) is not a torch archive (truncated, or not a checkpoint): {_EXPECTED}; "
            "if it was being written or copied when the run stopped, use an earlier checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointFileError(f"checkpoint {path} cannot be opened ({error}): {_EXPECTED}") from None
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointFileError(f"{path} is a zip archive but not a torch checkpoint (no data.pkl): {_EXPECTED}")
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load`` of a Lightning checkpoint, with any reading error turned into one that names the file."""
    import torch

    path = check_checkpoint_file(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises EOFError, UnpicklingError, RuntimeError, IndexError, ...
        raise CheckpointFileError(
            f"checkpoint {path} could not be read ({type(error).__name__}: {error}): {_EXPECTED}; the file is "
            "probably damaged, use an earlier checkpoint") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        official = isinstance(checkpoint, dict) and any(k in checkpoint for k in ("student", "teacher", "model"))
        hint = (" (it looks like an official CrIBo/BAM/VICRegL checkpoint: export it with --official auto, or "
                "load it with ssl_modules.load_official)") if official else ""
        raise CheckpointFileError(f"{path} holds no 'state_dict' entry: {_EXPECTED}{hint}")
    return checkpoint
