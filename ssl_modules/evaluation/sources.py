"""What ``evaluate`` can read: a checkpoint of this library, an exported backbone (a ``.pt`` with its ``.json``,
or a folder that timm loads by name), an official checkpoint of CrIBo/BAM/VICRegL, or a timm model name — always
as a frozen :class:`~ssl_modules.networks.backbones.Backbone`."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from torch import nn

from ssl_modules.networks.backbones import Backbone
from ssl_modules.checkpoints.export import CONFIG_NAME, is_export_folder, read_export
from ssl_modules.checkpoints.reading import UntrustedCheckpointError, load_module

__all__ = ["ModelSourceError", "load_backbone", "load_exported_backbone", "describe_source"]

_LOCAL_DIR = "local-dir:"  # timm's prefix of a model folder, accepted as it is


class ModelSourceError(ValueError):
    """The model to evaluate cannot be found or read; the message says what was expected."""


def load_backbone(source: str | Path | nn.Module, official: str | None = None, teacher: bool = True,
                  trust_checkpoint: bool = False, **timm_kwargs: Any) -> Backbone:
    """The backbone to evaluate. One read from a file or a name is frozen (gradients off); a module passed in
    is used as it is (``evaluate`` embeds without gradients and gives it back in its training mode).

    Args:
        source: an ``SSLModule`` (its teacher backbone where it has one, as CrIBo and BAM evaluate), a
            ``Backbone``, a Lightning checkpoint ``.ckpt`` of this library, an exported ``backbone.pt`` (with
            its ``.json`` beside it) or export folder (``config.json`` and ``model.safetensors``; also as
            ``local-dir:<folder>``), an official checkpoint (with ``official``), or a timm model name.
        official: the method of an official checkpoint (``"cribo"``, ``"bam"``, ``"vicregl"``, or ``"auto"``
            to tell it from the checkpoint); loaded with ``ssl_modules.methods.official.load_official``.
        teacher: take the teacher backbone where the module has one (False: the student).
        trust_checkpoint: read a checkpoint file with full unpickling, for a file that holds types a
            weights-only read refuses (the trust rule of ``ssl_modules.checkpoints.reading``; it can run code from
            the file, so only for files from a source you trust).
        **timm_kwargs: ``timm.create_model`` arguments for a timm name (``img_size``, ``patch_size``, ...).
    """
    backbone = _resolve(source, official, teacher, trust_checkpoint, timm_kwargs)
    if not isinstance(source, nn.Module):
        backbone.eval()
        backbone.requires_grad_(False)
    return backbone


def _resolve(source: Any, official: str | None, teacher: bool, trust: bool, timm_kwargs: dict[str, Any]) -> Backbone:
    if isinstance(source, Backbone):
        return source
    if isinstance(source, nn.Module):
        return _module_backbone(source, teacher)
    text = str(source)
    path = Path(text.removeprefix(_LOCAL_DIR)).expanduser()
    if official is not None:
        return _official(path, official, teacher, trust)
    if path.suffix == ".ckpt" or (path.is_file() and path.suffix not in (".pt", ".pth", ".json")):
        return _checkpoint(path, teacher, trust)
    if path.suffix in (".pt", ".pth", ".json") or is_export_folder(path) or text.startswith(_LOCAL_DIR):
        return _exported(path, trust)
    if path.is_dir() and not timm_name(text):
        return _exported(path, trust)  # a folder that is no export: the error says what one holds
    return _timm(text, timm_kwargs)


def _module_backbone(module: nn.Module, teacher: bool) -> Backbone:
    if teacher and hasattr(module, "embedding_backbone"):
        return module.embedding_backbone
    backbone = getattr(module, "backbone", None)
    if not isinstance(backbone, Backbone):
        raise ModelSourceError(f"{type(module).__name__} has no ssl_modules Backbone (`.backbone`); pass an "
                               "SSLModule, a Backbone, a checkpoint path or a timm model name")
    return backbone


def _checkpoint(path: Path, teacher: bool, trust: bool) -> Backbone:
    if not path.is_file():
        raise ModelSourceError(f"no checkpoint at {path}: pass the .ckpt a Trainer wrote (checkpoints/last.ckpt)")
    try:
        module = load_module(path, trust_checkpoint=trust)
    except UntrustedCheckpointError:
        raise  # its message names the file, the refused types and the flag
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, pickle.UnpicklingError) as error:
        raise ModelSourceError(f"{path} could not be read as a checkpoint of this library: {error}") from error
    return _module_backbone(module, teacher)


def _exported(path: Path, trust: bool) -> Backbone:
    """An export of ``python -m ssl_modules export`` in either layout (``ssl_modules.checkpoints.export``)."""
    if path.is_dir() and not is_export_folder(path):
        raise ModelSourceError(f"{path} is a folder without {CONFIG_NAME}: pass an export folder (config.json and "
                               "model.safetensors, as `python -m ssl_modules export <ckpt> <folder>` writes), a .ckpt, "
                               "an exported backbone .pt or a timm name")
    if not path.exists() and path.suffix not in (".pt", ".pth", ".json"):
        raise ModelSourceError(f"no export folder at {path}")  # local-dir:<path> of a missing folder
    try:
        return load_exported_backbone(path, trust_checkpoint=trust)
    except UntrustedCheckpointError:
        raise  # its message names the file, the refused types and the flag
    except ValueError as error:
        raise ModelSourceError(str(error)) from error


def _official(path: Path, method: str, teacher: bool, trust: bool) -> Backbone:
    """An official CrIBo/BAM/VICRegL training checkpoint, read by ``ssl_modules.methods.official.load_official``
    (``method="auto"`` tells the method from the checkpoint's layout)."""
    from ssl_modules.methods import official as official_loaders  # here: it builds every method's module

    if not path.is_file():
        raise ModelSourceError(f"no official checkpoint at {path}")
    try:
        module = official_loaders.load_official(path, None if method == "auto" else method,
                                                trust_checkpoint=trust)
    except UntrustedCheckpointError:
        raise  # its message names the file, the refused types and the flag
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as error:
        raise ModelSourceError(f"{path} could not be read as an official {method} checkpoint: {error}") from error
    return _module_backbone(module, teacher)


def timm_name(name: str) -> bool:
    """Whether timm has a model called ``name`` (a pretrained tag after a dot allowed)."""
    import timm

    return bool(timm.is_model(name.split(".")[0]))


def _timm(name: str, kwargs: dict[str, Any]) -> Backbone:
    if not timm_name(name):
        raise ModelSourceError(f"{name!r} is neither a file nor a timm model name; pass a .ckpt, an exported "
                               "backbone .pt, an official checkpoint with --official, or a timm name")
    return Backbone(name, **kwargs)


def describe_source(source: Any) -> str:
    """A short name of the evaluated model for reports."""
    if isinstance(source, nn.Module):
        name = getattr(getattr(source, "embedding_backbone", source), "name", type(source).__name__)
        return f"{type(source).__name__}({name})"
    return str(source)


def load_exported_backbone(path: str | Path, trust_checkpoint: bool = False, **options: Any) -> Backbone:
    """A :class:`~ssl_modules.Backbone` holding an export (either layout), loaded strictly. ``options``:
    ``Backbone`` options that are no timm arguments (``global_pool``, ``layer_scale``)."""
    name, kwargs, state = read_export(path, trust_checkpoint)
    backbone = Backbone(name, **options, **kwargs)
    backbone.load_official_weights(state)  # strict, with layer scales of ones for a layer_scale=False model
    return backbone
