"""The one writer of backbone exports, and their readers.

Every export goes through :func:`write_export`, which checks the weights once (:func:`check_finite_weights`) and
then writes one of two layouts, chosen by the output path:

- **a ``.pt`` / ``.pth`` file**: the state dict in timm's names (``torch.save``) and, beside it,
  ``<name>.json`` = ``{"name", "model_kwargs"}`` (``num_classes`` 0 included), so that
  ``timm.create_model(name, **model_kwargs).load_state_dict(torch.load(path))`` loads it strictly. This is the
  layout the library always wrote (``<run>/backbone.pt`` after ``fit``).
- **a folder** (any other path without a suffix, an existing folder or a path ending in ``/``): the layout of
  timm's ``save_for_hf``, ``config.json`` (``architecture``, ``num_classes`` 0, ``num_features``, ``model_args``:
  the ``timm.create_model`` keyword arguments, ``pretrained_cfg``: input size and the normalisation the
  backbone was trained with) and ``model.safetensors``, which timm loads by name, offline:
  ``timm.create_model("local-dir:<folder>", pretrained=True)``. ``fit`` writes ``<run>/backbone/`` too.

Paths with another suffix (``.ckpt``, ``.safetensors``, ...) are refused: name a ``.pt`` file or a folder.
The reader, :func:`read_export`, takes either layout (``ssl_modules.evaluation.sources.load_exported_backbone``
builds a backbone from it); a folder is read without unpickling (safetensors), so the trust rule has nothing
to refuse in it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ssl_modules.contracts import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from ssl_modules.networks.backbones import Backbone

__all__ = ["FILE_SUFFIXES", "CONFIG_NAME", "WEIGHTS_NAME", "ExportLayoutError", "export_layout",
           "check_finite_weights", "write_export", "export_backbone", "export_from_checkpoint", "export_checkpoint",
           "read_export", "is_export_folder", "timm_config", "NonFiniteWeightsError", "non_finite_weights"]

FILE_SUFFIXES = (".pt", ".pth")
CONFIG_NAME = "config.json"  # the names timm's local-dir loader looks for first
WEIGHTS_NAME = "model.safetensors"
# Entries of timm's pretrained_cfg that point at the source weights or describe its classifier: not this export's.
_SOURCE_ENTRIES = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag", "license",
                   "label_names", "label_descriptions", "label_offset", "test_input_size", "test_crop_pct",
                   "test_pool_size", "paper_ids", "paper_name", "notes", "origin_url")


class ExportLayoutError(ValueError):
    """An output path that names neither a ``.pt``/``.pth`` file nor a folder."""


class NonFiniteWeightsError(ValueError):
    """An export refused because a weight is NaN or infinite (the run diverged before this checkpoint)."""


def export_layout(output: str | Path) -> Literal["file", "folder"]:
    """``"file"`` for a ``.pt``/``.pth`` path, ``"folder"`` for an existing folder, a path ending in ``/`` or a
    path without a suffix; an :class:`ExportLayoutError` for anything else."""
    text = str(output)
    path = Path(text)
    if path.is_dir() or text.endswith(("/", "\\")):
        return "folder"
    if path.suffix in FILE_SUFFIXES:
        return "file"
    if not path.suffix:
        return "folder"
    raise ExportLayoutError(
        f"cannot export to {text}: name a .pt file (the state dict and a .json beside it, e.g. "
        f"{path.with_suffix('.pt')}) or a folder that timm loads by name (e.g. {path.with_suffix('')}/)")


def non_finite_weights(state: Mapping[str, Tensor]) -> str | None:
    """``"N tensors: a, b, ..."`` naming the first floating tensors of ``state`` that hold NaN/Inf; None if none
    does (one device sync for the whole state).

    Sharded tensors (FSDP2's DTensors) are checked shard by shard and the verdicts combined over all processes
    (one all-reduce: under FSDP2 every process must call this, as every process saves a checkpoint)."""
    floating = [(name, value) for name, value in state.items() if value.is_floating_point()]
    if not floating:
        return None
    local = [value.to_local() if _is_dtensor(value) else value for _, value in floating]
    flags = torch.stack([torch.isfinite(value).all() for value in local])
    if any(_is_dtensor(value) for _, value in floating):
        flags = flags.to(torch.int32)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    finite = flags.bool().tolist()
    bad = [name for (name, _), ok in zip(floating, finite) if not ok]
    if not bad:
        return None
    return f"{len(bad)} tensors: " + ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")


def check_finite_weights(state: Mapping[str, Tensor], output: str | Path) -> None:
    """The one finiteness check of an export: a :class:`NonFiniteWeightsError` naming the
    first tensors that hold NaN/Inf, before anything is written."""
    bad = non_finite_weights(state)
    if bad:
        raise NonFiniteWeightsError(f"non-finite weights ({bad}): export to {output} refused "
                                    "(train with a lower lr or export an earlier checkpoint)")


def write_export(state: Mapping[str, Tensor], name: str, model_kwargs: Mapping[str, Any], output: str | Path,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Path:
    """Write a backbone's weights in the layout ``output`` names (see the module docstring); returns ``output``.

    Args:
        state: the weights in timm's names (``Backbone.timm_state_dict()``).
        name: the timm model name.
        model_kwargs: the ``timm.create_model`` keyword arguments the backbone was built with.
        output: a ``.pt``/``.pth`` file or a folder.
        mean, std: the normalisation of the images the backbone was trained on (recorded in a folder's config).
    """
    layout = export_layout(output)
    check_finite_weights(state, output)
    kwargs = {k: v for k, v in model_kwargs.items() if k != "num_classes"}
    if layout == "file":
        return _write_file(state, name, kwargs, Path(output))
    return _write_folder(state, name, kwargs, Path(output), tuple(mean), tuple(std))


def _write_file(state: Mapping[str, Tensor], name: str, kwargs: dict[str, Any], output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state), output)
    meta = {"name": name, "model_kwargs": {**kwargs, "num_classes": 0}}
    output.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    return output


def _write_folder(state: Mapping[str, Tensor], name: str, kwargs: dict[str, Any], output: Path,
                  mean: tuple[float, ...], std: tuple[float, ...]) -> Path:
    from safetensors.torch import save_file

    config = timm_config(name, kwargs, mean, std)
    if output.exists() and not output.is_dir():
        raise ExportLayoutError(f"cannot export to the folder {output}: it is a file")
    output.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory: one contiguous copy each
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(output / WEIGHTS_NAME))
    (output / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
    return output


def timm_config(name: str, kwargs: Mapping[str, Any], mean: tuple[float, ...],
                std: tuple[float, ...]) -> dict[str, Any]:
    """The ``config.json`` that ``timm.create_model("local-dir:<folder>")`` reads: the architecture without a
    pretrained tag, no classifier, the constructor arguments and a ``pretrained_cfg`` describing these weights."""
    architecture = name.split(".", 1)[0]
    model = _timm_model(architecture, dict(kwargs))
    pretrained = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in _SOURCE_ENTRIES}
    size = kwargs.get("img_size")
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        pretrained["input_size"] = (pretrained.get("input_size", (3,))[0], height, width)
        pretrained.pop("pool_size", None)
    if kwargs.get("dynamic_img_size"):
        pretrained["fixed_input_size"] = False
    pretrained.update(architecture=architecture, num_classes=0, mean=mean, std=std,
                      custom_load=False)  # a native timm state dict: no model-specific loader
    return {"architecture": architecture, "num_classes": 0, "num_features": int(model.num_features),
            "model_args": dict(kwargs), "pretrained_cfg": pretrained}


def _timm_model(architecture: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The timm model without weights (on the meta device where its constructor allows), for its config."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
    except (NotImplementedError, RuntimeError):  # an initialiser that reads tensor values
        return timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)


# ----------------------------------------------------------------------------------------------- sources
def export_backbone(backbone: Backbone, output: str | Path, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Path:
    """Write a :class:`~ssl_modules.Backbone` (what ``SSLModule.export_backbone`` does with its embedding
    backbone): its weights in timm's names, layer scales a ``layer_scale=False`` model removed put back as ones."""
    state = backbone.timm_state_dict()
    if not any(_is_dtensor(value) for value in state.values()):
        return write_export(state, backbone.name, backbone.model_kwargs, output, mean, std)
    gathered = getattr(backbone, "gathered_export_state", None)
    if gathered is not None:  # a sharded backbone gathered at the end of training (ssl_modules.run.sharding)
        return write_export(gathered, backbone.name, backbone.model_kwargs, output, mean, std)
    # A sharded (FSDP2) backbone: every process gathers the whole tensors, the first one writes them.
    state = {key: value.full_tensor().cpu() if _is_dtensor(value) else value.cpu() for key, value in state.items()}
    try:
        if torch.distributed.get_rank() == 0:
            write_export(state, backbone.name, backbone.model_kwargs, output, mean, std)
    finally:
        torch.distributed.barrier()
    return Path(output)


def _is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a DTensor (a sharded parameter of an FSDP2 module)."""
    return isinstance(value, Tensor) and hasattr(value, "full_tensor")


def export_from_checkpoint(checkpoint: Mapping[str, Any], output: str | Path) -> Path:
    """Write the backbone recorded in a loaded Lightning checkpoint (its ``ssl_module_backbone`` entry) without
    importing the module's class (a user's subclass defined in a script)."""
    info = checkpoint["ssl_module_backbone"]
    prefix = info["state_prefix"]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    reference = next(iter(state.values()))
    for key, channels in info.get("removed_layer_scale", {}).items():
        state[key] = torch.ones(channels, dtype=reference.dtype)
    hparams = checkpoint.get("hyper_parameters") or {}
    return write_export(state, info["name"], info["model_kwargs"], output, hparams.get("mean", IMAGENET_MEAN),
                        hparams.get("std", IMAGENET_STD))


def export_checkpoint(checkpoint: str | Path, output: str | Path, trust_checkpoint: bool = False) -> Path:
    """Write the (teacher's, where there is one) backbone of a Lightning checkpoint of this library for timm;
    returns ``output`` (a ``.pt`` with its ``.json``, or a folder: see the module docstring). When the module's class
    cannot be imported (a user's subclass in a script), the backbone is taken from what the checkpoint records.
    ``trust_checkpoint``: the trust rule of ``ssl_modules.checkpoints.reading``. An official checkpoint is written
    by ``ssl_modules.methods.official.export_official``."""
    export_layout(output)  # before the checkpoint is read
    return _export_library_checkpoint(checkpoint, output, trust_checkpoint)


def _export_library_checkpoint(checkpoint: str | Path, output: str | Path, trust_checkpoint: bool) -> Path:
    """A checkpoint of this library: through its module, or from what it records when its class (a user's
    subclass in a script) cannot be imported."""
    from ssl_modules.checkpoints.reading import (importable_class, is_distributed_checkpoint, load_module,
                                                 read_checkpoint)

    # the trust rule: docs/resume.md; memory-mapped, as load_module reads the file again (an FSDP2 checkpoint
    # folder is read whole: its tensors are needed when the class cannot be imported)
    data = read_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint,
                           mmap=not is_distributed_checkpoint(checkpoint))
    if importable_class(data.get("ssl_module_class", "")) is None and "ssl_module_backbone" in data:
        return export_from_checkpoint(data, output)
    return load_module(checkpoint, trust_checkpoint=trust_checkpoint).export_backbone(output)


# ----------------------------------------------------------------------------------------------- readers
def is_export_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding an export's ``config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def read_export(path: str | Path, trust_checkpoint: bool = False) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """``(timm name, create_model kwargs without num_classes, state dict)`` of an export in either layout: a
    folder (or its ``config.json``), or a ``.pt``/``.pth`` (or its ``.json``). A ``ValueError`` says what is
    missing; a ``.pt`` is read under the trust rule of ``ssl_modules.checkpoints.reading``."""
    path = Path(path)
    if path.name == CONFIG_NAME and path.is_file():
        path = path.parent
    if path.is_dir():
        return _read_folder(path)
    return _read_file(path, trust_checkpoint)


def _read_folder(folder: Path) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    from safetensors.torch import load_file

    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for needed in (config_path, weights):
        if not needed.is_file():
            raise ValueError(f"{needed} not found: an exported backbone folder holds {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME}, as `python -m ssl_modules export <ckpt> <folder>` writes")
    config = _json(config_path, ("architecture",))
    kwargs = {k: v for k, v in dict(config.get("model_args") or {}).items() if k != "num_classes"}
    return config["architecture"], kwargs, load_file(str(weights))


def _read_file(path: Path, trust_checkpoint: bool) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    from ssl_modules.checkpoints.reading import read_checkpoint

    weights, meta_path = path.with_suffix(".pt"), path.with_suffix(".json")
    if not weights.is_file() and path.suffix == ".pth":
        weights = path
    for needed, what in ((weights, "weights"), (meta_path, "timm name and kwargs")):
        if not needed.is_file():
            raise ValueError(f"{needed} not found: an exported backbone is a .pt of weights with a .json "
                             f"({what}) beside it, or a folder, as `python -m ssl_modules export` writes")
    meta = _json(meta_path, ("name",))
    kwargs = {k: v for k, v in dict(meta.get("model_kwargs") or {}).items() if k != "num_classes"}
    return meta["name"], kwargs, read_checkpoint(weights, trust_checkpoint=trust_checkpoint, lightning=False)


def _json(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        missing = [key for key in required if key not in data]
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not an export's metadata: {error}") from error
    if missing:
        raise ValueError(f"{path} is not an export's metadata: it has no {', '.join(map(repr, missing))}")
    return data
