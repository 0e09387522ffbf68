"""The one reader of checkpoint files, with the trust rule (``docs/resume.md``) and errors that name the file.

Every checkpoint the library opens (``fit --ckpt_path``, ``export``, ``evaluate``, ``SSLModule.load_any``,
``Backbone(weights=...)``, ``load_official``) goes through :func:`read_checkpoint`:

- by default the file is read with ``torch.load(weights_only=True)``: tensors, containers and plain values,
  plus :data:`SAFE_TYPES`, the non-tensor types that the official CrIBo / BAM / VICRegL checkpoints hold
  (the ``argparse.Namespace`` of their training arguments and the ``pathlib`` paths inside it), allowed for
  that read only. Lightning checkpoints of this library need nothing more.
- anything else is refused with an :class:`UntrustedCheckpointError` that names the file, the refused
  types and the flag that reads it anyway;
- with ``trust_checkpoint=True`` (``--trust-checkpoint`` in ``evaluate`` and ``export``) the file is fully
  unpickled, which runs whatever code it carries, and a :class:`CheckpointTrustWarning` names the file.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import pathlib
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssl_modules.methods.base import SSLModule

__all__ = ["SAFE_TYPES", "TRUST_FLAG", "CheckpointFileError", "CheckpointTrustWarning", "UntrustedCheckpointError",
           "check_checkpoint_file", "class_path", "importable_class", "is_distributed_checkpoint", "load_module",
           "read_checkpoint", "recorded_class", "safe_types_allowed"]

_DCP_META = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint folder
_EXPECTED = "expected a .ckpt file written by a Lightning Trainer (ModelCheckpoint or Trainer.save_checkpoint)"

#: Non-tensor types a weights-only read accepts besides torch's own: the official checkpoints' ``args``.
SAFE_TYPES: tuple[type, ...] = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath,
                                pathlib.PurePosixPath, pathlib.PureWindowsPath)

#: How a user reads a refused file anyway, as the error messages say it.
TRUST_FLAG = "trust_checkpoint=True (Python) or --trust-checkpoint (evaluate, export)"


class CheckpointFileError(ValueError):
    """A checkpoint path that is missing, empty, truncated or not a Lightning checkpoint."""


class UntrustedCheckpointError(CheckpointFileError):
    """A checkpoint that holds types a weights-only read refuses (unpickling them could run code).

    Attributes:
        path: the file.
        refused: the dotted names of the refused types or functions.
    """

    def __init__(self, message: str, path: Path, refused: list[str]) -> None:
        super().__init__(message)
        self.path = path
        self.refused = refused


class CheckpointTrustWarning(UserWarning):
    """A checkpoint read with ``trust_checkpoint=True``: fully unpickled, so any code it carries has run."""


def check_checkpoint_file(path: str | Path) -> Path:
    """Cheap structural check (no tensors read): the file exists, is not empty and is a complete torch archive.

    A file cut short by an interrupted save or copy loses the archive's directory, which sits at its end, so
    truncation is caught here without unpickling anything.
    """
    path = Path(path)
    if is_distributed_checkpoint(path):  # a folder of shards (FSDP2, docs/fsdp2.md): check its metadata file
        check_checkpoint_file(path / _DCP_META)
        return path
    _check_exists(path, f"checkpoint {path}", _EXPECTED)
    size = path.stat().st_size
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


def is_distributed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a Lightning distributed checkpoint: the folder ``ModelParallelStrategy`` saves (one
    shard file per process, ``.metadata`` of torch's distributed checkpoint, ``meta.pt`` with everything else)."""
    path = Path(path)
    return path.is_dir() and (path / _DCP_META).is_file() and (path / ".metadata").is_file()


def _read_distributed_checkpoint(path: Path, map_location: Any, trust: bool, label: str, shards: bool) -> Any:
    """A distributed checkpoint folder as one Lightning checkpoint dict: ``meta.pt`` (read under the trust rule)
    with the whole ``state_dict`` assembled from the shards (``dcp_to_torch_save``, in this one process); the
    optimizer shards are left out (nothing that reads a checkpoint as a file needs them: resume reads the folder
    through the strategy). Without ``shards`` (a cheap look, ``mmap=True``), ``state_dict`` is left empty."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = _load(path / _DCP_META, map_location, trust, False, label, _EXPECTED)
    if not shards:
        if isinstance(checkpoint, dict):
            checkpoint.setdefault("state_dict", {})
        return checkpoint
    with tempfile.TemporaryDirectory() as scratch:
        whole = Path(scratch) / "whole.pt"
        try:
            dcp_to_torch_save(path, whole)
        except Exception as error:
            raise _unreadable(label, error, _EXPECTED) from error
        with safe_types_allowed():
            whole_state = torch.load(whole, map_location=map_location, weights_only=True)
    if isinstance(checkpoint, dict):
        checkpoint["state_dict"] = whole_state.get("state_dict", {})
    return checkpoint


def _check_exists(path: Path, label: str, expected: str) -> None:
    """A ``CheckpointFileError`` unless ``path`` is a non-empty file."""
    if not path.exists():
        raise CheckpointFileError(f"{label} does not exist: {expected}")
    if not path.is_file():
        raise CheckpointFileError(f"{label} is a directory, not a file: {expected}")
    if path.stat().st_size == 0:
        raise CheckpointFileError(f"{label} is empty (0 bytes): {expected}; use an earlier checkpoint")


def safe_types_allowed() -> contextlib.AbstractContextManager[None]:
    """A context in which ``torch.load(weights_only=True)`` also accepts :data:`SAFE_TYPES` (and only then)."""
    import torch

    return torch.serialization.safe_globals(list(SAFE_TYPES))


def read_checkpoint(path: str | Path, map_location: Any = "cpu", *, trust_checkpoint: bool = False,
                    mmap: bool = False, lightning: bool = True, label: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file under the trust rule (the module's docstring); every error names the file.

    Args:
        path: the file.
        map_location: ``torch.load``'s ``map_location``.
        trust_checkpoint: fully unpickle the file (it can run any code it carries), with a
            :class:`CheckpointTrustWarning` naming it; only for files from a source you trust.
        mmap: memory-map the tensors instead of reading them (a cheap look at the entries); a distributed
            checkpoint folder (:func:`is_distributed_checkpoint`) then gives its entries with an empty
            ``state_dict``, else its whole state assembled from the shards.
        lightning: the file must be a Lightning checkpoint (a torch archive with a ``state_dict`` entry);
            False: any dict (an official checkpoint, a state dict of weights).
        label: how messages name the file (default ``"checkpoint <path>"``).

    Raises:
        UntrustedCheckpointError: the file holds types outside the weights-only set and ``SAFE_TYPES``.
        CheckpointFileError: the file is missing, empty, damaged, or not the kind of checkpoint expected.
    """
    path = Path(path)
    label = label or f"checkpoint {path}"
    expected = _EXPECTED if lightning else "expected a PyTorch checkpoint or state dict (torch.save)"
    if lightning:
        check_checkpoint_file(path)
    else:
        _check_exists(path, label, expected)
    if is_distributed_checkpoint(path):
        checkpoint = _read_distributed_checkpoint(path, map_location, trust_checkpoint, label, shards=not mmap)
    else:
        checkpoint = _load(path, map_location, trust_checkpoint, mmap, label, expected)
    return _checked_content(checkpoint, label, lightning, expected)


def _load(path: Path, map_location: Any, trust: bool, mmap: bool, label: str, expected: str) -> Any:
    """``torch.load`` under the trust rule; any failure becomes an error that names the file."""
    import torch

    if trust:
        warnings.warn(f"{label} is read with trust_checkpoint=True: it is fully unpickled, so any code it carries "
                      "runs; pass it only for files from a source you trust", CheckpointTrustWarning, stacklevel=3)
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        with safe_types_allowed():
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = [] if trust else _refused_globals(path, error)
        if refused:
            raise _untrusted(path, label, refused) from None
        raise _unreadable(label, error, expected) from error
    except Exception as error:  # torch raises EOFError, RuntimeError, IndexError, ... for damaged files
        raise _unreadable(label, error, expected) from error


def _unreadable(label: str, error: BaseException, expected: str) -> CheckpointFileError:
    return CheckpointFileError(f"{label} could not be read ({type(error).__name__}: {error}): {expected}; the file "
                               "is probably damaged, use an earlier checkpoint")


def _untrusted(path: Path, label: str, refused: list[str]) -> UntrustedCheckpointError:
    names = ", ".join(refused)
    return UntrustedCheckpointError(
        f"{label} holds {names}, which a weights-only read refuses (unpickling it could run code from the file): "
        f"if you trust where {path.name} comes from, read it with {TRUST_FLAG}; checkpoints of this library and "
        "the official CrIBo/BAM/VICRegL ones need no trust", path, refused)


def _refused_globals(path: Path, error: BaseException) -> list[str]:
    """The dotted names in ``path`` that a weights-only read refuses (beyond ``SAFE_TYPES``)."""
    import torch

    allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in SAFE_TYPES}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file: the error names the first refused global
        names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(error))
    return [name for name in dict.fromkeys(names) if name not in allowed]


def _checked_content(checkpoint: Any, label: str, lightning: bool, expected: str) -> dict[str, Any]:
    """The checkpoint if it is the dict expected; else an error naming the file and what it holds."""
    if not isinstance(checkpoint, dict):
        raise CheckpointFileError(f"{label} holds a {type(checkpoint).__name__}, not a dict: {expected}")
    if lightning and "state_dict" not in checkpoint:
        official = any(key in checkpoint for key in ("student", "teacher", "model"))
        hint = (" (it looks like an official CrIBo/BAM/VICRegL checkpoint: export it with --official auto, or "
                "load it with ssl_modules.load_official)") if official else ""
        raise CheckpointFileError(f"{label} holds no 'state_dict' entry: {expected}{hint}")
    return checkpoint


@contextlib.contextmanager
def _lightning_reads(trust: bool) -> Iterator[dict[str, Any]]:
    """Keyword arguments and context for Lightning's own read of a file this module has read already."""
    import lightning.pytorch as pl

    if trust:
        # Lightning >= 2.6 takes weights_only; older releases pass torch's default (weights_only=True)
        takes = "weights_only" in inspect.signature(pl.LightningModule.load_from_checkpoint).parameters
        yield {"weights_only": False} if takes else {}
        return
    with safe_types_allowed():
        yield {}


def load_module(path: str | Path, map_location: Any = "cpu", *, trust_checkpoint: bool = False) -> SSLModule:
    """The ``SSLModule`` of a Lightning checkpoint of this library (its class is recorded in the file), read
    under the trust rule (:func:`read_checkpoint`)."""
    path = Path(path)
    checkpoint = read_checkpoint(path, trust_checkpoint=trust_checkpoint, mmap=True)
    class_path = checkpoint.get("ssl_module_class")
    if class_path is None:
        raise CheckpointFileError(f"{path} was not written by an SSLModule (no 'ssl_module_class' entry)")
    cls = recorded_class(class_path)
    # The weights a run started from are in the checkpoint: its class must not read them again (the file may
    # be gone); the record of where they came from is kept.
    started_from = (checkpoint.get("hyper_parameters") or {}).get("backbone_weights")
    skip_start = {"backbone_weights": None} if started_from is not None else {}
    with contextlib.ExitStack() as stack:
        if is_distributed_checkpoint(path):  # an FSDP2 folder: its shards assembled into one file Lightning reads
            import tempfile

            import torch

            whole = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "whole.ckpt"
            torch.save(read_checkpoint(path, trust_checkpoint=trust_checkpoint), whole)
            path_read = whole
        else:
            path_read = path
        with _lightning_reads(trust_checkpoint) as kwargs:
            module = cls.load_from_checkpoint(path_read, map_location=map_location, **kwargs, **skip_start)
    if skip_start:
        module.hparams["backbone_weights"] = started_from
        module.backbone_source = checkpoint.get("ssl_module_backbone_source")
    return module


def class_path(cls: type) -> str:
    """The dotted name a checkpoint records for ``cls``: the public name (``ssl_modules.CrIBo``) for the library's
    own classes, which survives moves inside the package, the module path for any other class."""
    import ssl_modules

    if getattr(ssl_modules, cls.__name__, None) is cls:
        return f"ssl_modules.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def importable_class(path: str) -> type | None:
    """:func:`recorded_class`, or None where the class cannot be imported (a user's script, a moved module)."""
    try:
        return recorded_class(path)
    except (ImportError, AttributeError, ValueError):
        return None


def recorded_class(path: str) -> type:
    """The class a checkpoint's dotted name records; a library class recorded under a module path of an earlier
    release is found by its public name."""
    import ssl_modules

    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        if module_name.startswith("ssl_modules.") and class_name in ssl_modules.__all__:
            return getattr(ssl_modules, class_name)
        raise
