"""What ``evaluate`` can read: a checkpoint of this library, an exported backbone, an official checkpoint of
CrIBo/BAM/VICRegL, or a timm model name — always as a frozen :class:`~ssl_modules.networks.backbones.Backbone`."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

from torch import nn

from ssl_modules.networks.backbones import Backbone
from ssl_modules.checkpoints.reading import UntrustedCheckpointError, load_module, read_checkpoint

__all__ = ["ModelSourceError", "load_backbone", "describe_source"]


class ModelSourceError(ValueError):
    """The model to evaluate cannot be found or read; the message says what was expected."""


def load_backbone(source: str | Path | nn.Module, official: str | None = None, teacher: bool = True,
                  trust_checkpoint: bool = False, **timm_kwargs: Any) -> Backbone:
    """The backbone to evaluate. One read from a file or a name is frozen (gradients off); a module passed in
    is used as it is (``evaluate`` embeds without gradients and gives it back in its training mode).

    Args:
        source: an ``SSLModule`` (its teacher backbone where it has one, as CrIBo and BAM evaluate), a
            ``Backbone``, a Lightning checkpoint ``.ckpt`` of this library, an exported ``backbone.pt`` (with
            its ``.json`` beside it), an official checkpoint (with ``official``), or a timm model name.
        official: the method of an official checkpoint (``"cribo"``, ``"bam"``, ``"vicregl"``, or ``"auto"``
            to tell it from the checkpoint); loaded with ``ssl_modules.checkpoints.official.load_official``.
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
    path = Path(str(source)).expanduser()
    if official is not None:
        return _official(path, official, teacher, trust)
    if path.suffix == ".ckpt" or (path.is_file() and path.suffix not in (".pt", ".pth", ".json")):
        return _checkpoint(path, teacher, trust)
    if path.suffix in (".pt", ".pth", ".json"):
        return _exported(path, trust)
    return _timm(str(source), timm_kwargs)


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
    weights, meta_path = path.with_suffix(".pt"), path.with_suffix(".json")
    if not weights.is_file() and path.suffix == ".pth":
        weights = path
    for needed, what in ((weights, "weights"), (meta_path, "timm name and kwargs")):
        if not needed.is_file():
            raise ModelSourceError(f"{needed} not found: an exported backbone is a .pt of weights with a .json "
                                   f"({what}) beside it, as `python -m ssl_modules export` writes")
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["name"], dict(meta.get("model_kwargs", {}))
    except (ValueError, KeyError) as error:
        raise ModelSourceError(f"{meta_path} is not an export's metadata (needs 'name' and 'model_kwargs'): "
                               f"{error}") from error
    kwargs.pop("num_classes", None)
    backbone = Backbone(name, **kwargs)
    state = read_checkpoint(weights, trust_checkpoint=trust, lightning=False)
    backbone.model.load_state_dict(state, strict=True)
    return backbone


def _official(path: Path, method: str, teacher: bool, trust: bool) -> Backbone:
    """An official CrIBo/BAM/VICRegL training checkpoint, read by ``ssl_modules.checkpoints.official.load_official``
    (``method="auto"`` tells the method from the checkpoint's layout)."""
    from ssl_modules.checkpoints import official as official_loaders  # here: it builds every method's module

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


def _timm(name: str, kwargs: dict[str, Any]) -> Backbone:
    import timm

    if not timm.is_model(name.split(".")[0]):
        raise ModelSourceError(f"{name!r} is neither a file nor a timm model name; pass a .ckpt, an exported "
                               "backbone .pt, an official checkpoint with --official, or a timm name")
    return Backbone(name, **kwargs)


def describe_source(source: Any) -> str:
    """A short name of the evaluated model for reports."""
    if isinstance(source, nn.Module):
        name = getattr(getattr(source, "embedding_backbone", source), "name", type(source).__name__)
        return f"{type(source).__name__}({name})"
    return str(source)
