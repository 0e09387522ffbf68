"""Official checkpoints in and out: CrIBo, BAM and VICRegL training checkpoints in their authors' key layouts.

``load_official(path)`` builds the method's module and loads a full official checkpoint into it (student and
teacher backbones and heads; CrIBo's centers and memory bank where present), with a strict key check;
``save_official(module, path)`` writes a module in the same layout, so a run can move between this library
and the official code in both directions. ``load_backbone_weights(path, name)`` reads any official backbone
file (or the teacher's backbone of a full checkpoint) into a :class:`~ssl_modules.Backbone`.

The layouts (``docs/fidelity.md``):

- CrIBo ``checkpoint.pth``: ``student`` (``module.backbone.*``, ``module.head.mlp.<i>.*``,
  ``module.head.last_layer{,_c}.weight_{g,v}``), ``teacher`` (the same without ``module.``, with it when the
  head has BatchNorm), ``dino_loss`` (``center``, ``center_c``), ``centroids_queue_cpu`` (the object bank
  ``(2, K * S, D)``), ``cpv_queue_cpu`` (objects per image slot ``(S,)``), ``cls_queue_cpu`` (never read by
  the official code: ignored on load, written as zeros), ``epoch``, ``optimizer``, ``args``.
- BAM: ``model`` = the student-teacher wrapper: ``student.module.backbone.*``,
  ``student.module.proj_head.projector.<i>.*``, ``teacher.backbone.*``, ``teacher.proj_head.projector.<i>.*``
  (without teacher: ``module.backbone.*``, ``module.proj_head.projector.<i>.*``).
- VICRegL ``model.pth``: ``model`` = ``module.backbone.*`` (torchvision ResNet names; official ConvNeXt
  names: ``downsample_layers``, ``stages.<i>.<j>.{dwconv,pwconv1,pwconv2}``, final ``norm``),
  ``module.projector.<i>.*`` (global expander), ``module.maps_projector.<i>.*`` (local projector),
  ``module.classifier.*`` (the online linear classifier: the library has none, so it is ignored on load
  and written as zeros).

MLP layer indices are the official ``nn.Sequential`` positions: the library's MLPs have the same layers in
the same order plus ``Identity`` placeholders where a norm is off, which do not count.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_modules.networks.backbones import Backbone
from ssl_modules.methods.base import SSLModule
from ssl_modules.checkpoints.reading import read_checkpoint

__all__ = ["load_official", "load_official_state", "save_official", "official_state", "load_backbone_weights",
           "export_official", "detect_method"]

METHODS = ("cribo", "bam", "vicregl")
# Official entries the library has no counterpart for: accepted on load, never required.
_IGNORED = {"cribo": {("cls_queue_cpu", "")}, "bam": set(), "vicregl": set()}
_IGNORED_PREFIXES = {"vicregl": ("module.classifier.",)}
# CrIBo entries that a checkpoint may leave out as a whole (a release of the networks only).
_OPTIONAL_ENTRIES = {"dino_loss", "centroids_queue_cpu", "cpv_queue_cpu"}

Key = tuple[str, str]  # (entry of the checkpoint, key inside it; "" for a tensor stored at the top level)


# ------------------------------------------------------------------------------------------ key mapping
def _sequential_keys(ours: str, layers: nn.Sequential, official: str) -> dict[str, str]:
    """Our ``<ours><child>.<param>`` -> official ``<official><index>.<param>``; Identity layers do not count."""
    out, index = {}, 0
    for child_name, child in layers.named_children():
        if isinstance(child, nn.Identity):
            continue
        for key in child.state_dict():
            out[f"{ours}{child_name}.{key}"] = f"{official}{index}.{key}"
        index += 1
    return out


def _official_convnext_key(key: str) -> str:
    """timm's ConvNeXt name -> the official (facebookresearch/ConvNeXt, VICRegL) name."""
    key = key.replace("stem.", "downsample_layers.0.")
    key = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", key)
    key = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", key)
    return key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm", "norm")


def _backbone_keys(ours: str, backbone: Backbone, official: str) -> dict[str, str]:
    """Backbone parameters: timm's names are the official ones for ViTs (DINO's and BAM's) and ResNets
    (torchvision's); ConvNeXt is renamed."""
    convnext = type(backbone.model).__name__ == "ConvNeXt"
    rename = _official_convnext_key if convnext else (lambda key: key)
    return {f"{ours}model.{key}": f"{official}{rename(key)}" for key in backbone.model.state_dict()}


def _cribo_keys(module: SSLModule) -> dict[str, Key]:
    keys: dict[str, Key] = {}
    teacher_wrap = ("module." if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.head.modules())
                    else "")
    for entry, ours, wrap in (("student", "", "module."), ("teacher", "teacher.", teacher_wrap)):
        backbone = module.backbone if entry == "student" else module.teacher["backbone"]
        head = module.head if entry == "student" else module.teacher["head"]
        names = _backbone_keys(f"{ours}backbone.", backbone, f"{wrap}backbone.")
        names.update(_sequential_keys(f"{ours}head.mlp.", head.mlp, f"{wrap}head.mlp."))
        for layer in ("last_layer", "last_layer_c"):
            for param in ("weight_g", "weight_v"):
                names[f"{ours}head.{layer}.{param}"] = f"{wrap}head.{layer}.{param}"
        keys.update({k: (entry, v) for k, v in names.items()})
    keys.update({"center": ("dino_loss", "center"), "object_center": ("dino_loss", "center_c"),
                 "bank": ("centroids_queue_cpu", ""), "bank_counts": ("cpv_queue_cpu", "")})
    return keys


def _bam_keys(module: SSLModule) -> dict[str, Key]:
    parts = [("", "student.module." if module.has_teacher else "module.", module.backbone, module.projector)]
    if module.has_teacher:
        parts.append(("teacher.", "teacher.", module.teacher["backbone"], module.teacher["projector"]))
    keys: dict[str, Key] = {}
    for ours, official, backbone, projector in parts:
        names = _backbone_keys(f"{ours}backbone.", backbone, f"{official}backbone.")
        names.update(_sequential_keys(f"{ours}projector.", projector, f"{official}proj_head.projector."))
        keys.update({k: ("model", v) for k, v in names.items()})
    return keys


def _vicregl_keys(module: SSLModule) -> dict[str, Key]:
    names = _backbone_keys("backbone.", module.backbone, "module.backbone.")
    if module.expander is not None:
        names.update(_sequential_keys("expander.", module.expander, "module.projector."))
    if module.projector is not None:
        names.update(_sequential_keys("projector.", module.projector, "module.maps_projector."))
    return {k: ("model", v) for k, v in names.items()}


_KEYS = {"cribo": _cribo_keys, "bam": _bam_keys, "vicregl": _vicregl_keys}


def _method_of(module: SSLModule) -> str:
    for method in METHODS:
        if any(cls.__name__.lower() == method for cls in type(module).__mro__):
            return method
    raise ValueError(f"{type(module).__name__} is none of the methods with an official layout ({', '.join(METHODS)})")


# ------------------------------------------------------------------------------------------------- out
def _state_with_reference_bank(module: SSLModule) -> dict[str, Tensor]:
    """``module.state_dict()`` where CrIBo's ring-buffer bank also appears in the official (newest-first)
    layout as ``bank`` / ``bank_counts``; CrIBo's load hook turns those keys back into the ring buffer."""
    state = module.state_dict()
    bank = getattr(module, "memory_bank", None)
    if bank is not None:
        reference = bank.logical()
        state["bank"], state["bank_counts"] = reference["bank"], reference["counts"]
    return state


def official_state(module: SSLModule, epoch: int = 0, classifier_classes: int = 1000) -> dict[str, Any]:
    """The module's weights as the official code of its method saves them (see the module docstring).

    Args:
        module: a ``CrIBo``, ``BAM`` or ``VICRegL``.
        epoch: the ``epoch`` entry (the official code resumes at the next epoch).
        classifier_classes: VICRegL only: rows of the zero online classifier the official model expects.
    """
    method = _method_of(module)
    ours = _state_with_reference_bank(module)
    checkpoint: dict[str, Any] = {"epoch": epoch}
    for our_key, (entry, key) in _KEYS[method](module).items():
        value = ours[our_key].detach().clone()
        if our_key == "bank_counts":
            value = value.to(torch.int32)  # the official per-slot counts are int32
        if key:
            checkpoint.setdefault(entry, {})[key] = value
        else:
            checkpoint[entry] = value
    if method == "cribo":
        slots, width = ours["bank_counts"].shape[0], ours["bank"].shape[-1]
        checkpoint["cls_queue_cpu"] = torch.zeros(2, slots, width, dtype=ours["bank"].dtype)
    if method == "vicregl":
        width = module.backbone.num_features
        checkpoint["model"]["module.classifier.weight"] = torch.zeros(classifier_classes, width)
        checkpoint["model"]["module.classifier.bias"] = torch.zeros(classifier_classes)
    return checkpoint


def save_official(module: SSLModule, path: str | Path, **kwargs: Any) -> Path:
    """Write :func:`official_state` to ``path`` (``torch.save``); ``kwargs`` go to :func:`official_state`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state(module, **kwargs), path)
    return path


# -------------------------------------------------------------------------------------------------- in
def _flatten(checkpoint: dict[str, Any], method: str) -> dict[Key, Tensor]:
    """Every tensor of the checkpoint's model entries as ``(entry, key)``; optimizer, args, epoch are skipped."""
    entries = {"cribo": ("student", "teacher", "dino_loss"), "bam": ("model",), "vicregl": ("model",)}[method]
    flat: dict[Key, Tensor] = {}
    for entry in entries:
        for key, value in (checkpoint.get(entry) or {}).items():
            if isinstance(value, Tensor):
                flat[(entry, key.replace("_orig_mod.", ""))] = value
    for entry, value in checkpoint.items():
        if isinstance(value, Tensor):
            flat[(entry, "")] = value
    return flat


def _show(keys: set[Key], limit: int = 8) -> str:
    shown = [f"{entry}[{key!r}]" if key else entry for entry, key in sorted(keys)[:limit]]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_official_state(module: SSLModule, checkpoint: dict[str, Any]) -> None:
    """Load an official checkpoint (already read) into ``module``, strictly: every official key must find
    its place in the module and every part of the module in the layout must be in the checkpoint (CrIBo's
    centers and bank may be absent as a whole; then the module keeps its own). Shapes must agree."""
    method = _method_of(module)
    mapping = _KEYS[method](module)
    flat = _flatten(checkpoint, method)
    teacher_keys = [k for k in flat if k[0] == "teacher"]
    if method == "cribo" and teacher_keys and all(k.startswith("module.") for _, k in teacher_keys):
        wrapped = {("teacher", k) for _, k in mapping.values()}  # a teacher saved with or without DDP's module.
        if not any(k in wrapped for k in teacher_keys):
            flat = {(e, k.removeprefix("module.") if e == "teacher" else k): v for (e, k), v in flat.items()}
    present_entries = {entry for entry, _ in flat}
    expected = {key for key in mapping.values() if not (key[0] in _OPTIONAL_ENTRIES and key[0] not in present_entries)}
    ignored = {k for k in flat if k in _IGNORED[method] or k[1].startswith(_IGNORED_PREFIXES.get(method, ()))}
    missing, extra = expected - set(flat), set(flat) - expected - ignored
    if missing or extra:
        raise ValueError(
            f"the official {method} checkpoint does not fit this {type(module).__name__}: "
            f"missing {_show(missing) or 'nothing'}; unexpected {_show(extra) or 'nothing'}. Build the module "
            "with the checkpoint's architecture (backbone name and backbone_kwargs, head widths) "
            "or pick the right method")
    ours = _state_with_reference_bank(module)
    state, wrong = {}, []
    for our_key, key in mapping.items():
        if key not in flat:
            continue
        value = flat[key]
        if value.shape != ours[our_key].shape:
            wrong.append(f"{_show({key})}: {tuple(value.shape)} vs {tuple(ours[our_key].shape)}")
        state[our_key] = value.to(ours[our_key].dtype)
    if wrong:
        raise ValueError(f"the official {method} checkpoint has other shapes than this module: {'; '.join(wrong[:8])}")
    bank, counts = state.pop("bank", None), state.pop("bank_counts", None)
    if bank is not None and counts is not None:  # straight into the ring buffer: no second bank-size copy
        module.memory_bank.load_logical_(bank, counts)
    module.load_state_dict(state, strict=False)


def detect_method(checkpoint: dict[str, Any]) -> str:
    """``"cribo"``, ``"bam"`` or ``"vicregl"`` from an official checkpoint's layout."""
    if isinstance(checkpoint.get("student"), dict) and isinstance(checkpoint.get("teacher"), dict):
        return "cribo"
    model = checkpoint.get("model")
    if isinstance(model, dict):
        if any(".proj_head." in key for key in model):
            return "bam"
        if any(key.startswith("module.maps_projector.") or key.startswith("module.projector.") for key in model):
            return "vicregl"
    raise ValueError("not an official CrIBo, BAM or VICRegL checkpoint (top-level keys: "
                     f"{sorted(checkpoint)[:10]}); pass method='cribo', 'bam' or 'vicregl'")


def load_official(path: str | Path, method: str | None = None, module: SSLModule | None = None, *,
                  trust_checkpoint: bool = False, **module_kwargs: Any) -> SSLModule:
    """A ``CrIBo``, ``BAM`` or ``VICRegL`` module holding a full official checkpoint.

    Args:
        path: the official training checkpoint (``checkpoint.pth`` / ``model.pth``).
        method: ``"cribo"``, ``"bam"`` or ``"vicregl"``; ``None`` tells it from the layout.
        module: load into this module instead of building one.
        trust_checkpoint: read the file with full unpickling, for a checkpoint that holds types beyond the
            official ones (the trust rule of ``ssl_modules.checkpoints.reading``; it can run code from the file).
        **module_kwargs: arguments of the method's constructor. Head widths, CrIBo's bank size and number of
            clusters are read from the tensors' shapes; the backbone (``backbone``, ``backbone_kwargs``) from
            its shapes (ViTs, torchvision ResNets, ConvNeXts) or the official ``args.arch`` when not given.
    """
    checkpoint = read_checkpoint(path, trust_checkpoint=trust_checkpoint, lightning=False)
    method = method or (_method_of(module) if module is not None else detect_method(checkpoint))
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if module is None:
        module = _build(method, checkpoint, module_kwargs)
    try:
        load_official_state(module, checkpoint)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return module


def load_backbone_weights(path: str | Path, name: str | None = None, *, trust_checkpoint: bool = False,
                          **kwargs: Any) -> Backbone:
    """A :class:`~ssl_modules.Backbone` ``name`` (``kwargs``: its options and timm arguments) holding the
    weights of ``path``: an official backbone release, a full official checkpoint (its teacher's backbone),
    a Lightning checkpoint of this library, or an export of ``export`` (``backbone.pt``, or a folder with
    ``config.json`` and ``model.safetensors``). For an export ``name`` may be left out: the export records it,
    and its timm arguments are the defaults of ``kwargs``. ``trust_checkpoint``: see :func:`load_official`."""
    from ssl_modules.checkpoints.export import is_export_folder, read_export

    if is_export_folder(path) or Path(path).with_suffix(".json").is_file():  # an export records its model
        recorded, model_kwargs, state = read_export(path, trust_checkpoint)
        backbone = Backbone(name or recorded, **{**model_kwargs, **kwargs})
        try:
            backbone.load_official_weights(state)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        return backbone
    if name is None:
        raise ValueError(f"{path}: name the timm model of these weights (only an export records it)")
    return Backbone(name, weights=path, trust_checkpoint=trust_checkpoint, **kwargs)


def export_official(path: str | Path, output: str | Path, method: str | None = None, *,
                    trust_checkpoint: bool = False, **module_kwargs: Any) -> Path:
    """Write the (teacher's) backbone of an official checkpoint as timm weights, as ``export`` does for the
    library's own checkpoints (a ``.pt`` with a ``.json`` of the timm name and kwargs, or a folder that timm loads
    by name: ``ssl_modules.checkpoints.export``). ``trust_checkpoint``: see :func:`load_official`."""
    module = load_official(path, method, trust_checkpoint=trust_checkpoint, **module_kwargs)
    return module.export_backbone(output)


# --------------------------------------------------------------------------------------------- building
def _linear_widths(state: dict[str, Tensor], prefix: str) -> list[int]:
    """Output widths of the 2-D weights under ``prefix<index>.weight``, in index order (the Linear layers)."""
    found = {}
    for key, value in state.items():
        match = re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", key)
        if match and value.ndim == 2:
            found[int(match.group(1))] = value.shape[0]
    return [found[i] for i in sorted(found)]


def _has_norm(state: dict[str, Tensor], prefix: str) -> bool:
    """A norm layer (1-D weight) between the Linear layers of an official MLP."""
    return any(key.startswith(prefix) and key.endswith(".weight") and value.ndim == 1 for key, value in state.items())


def _vit_from_shapes(state: dict[str, Tensor]) -> tuple[str, dict[str, Any]] | None:
    """A timm ViT name and kwargs from a DINO/timm ViT state dict (embed width, patch, depth, grid)."""
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        return None
    width = state["cls_token"].shape[-1]
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(width)
    if size is None:
        return None
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    kwargs: dict[str, Any] = {}
    if patch != 16:
        kwargs["patch_size"] = patch
    if depth != (24 if size == "large" else 12):
        kwargs["depth"] = depth
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5) if "pos_embed" in state else 224 // patch
    if grid * patch != 224:
        kwargs["img_size"] = grid * patch
    return f"vit_{size}_patch16_224", kwargs


_CONVNEXTS = {(40, 6): "atto", (48, 6): "femto", (64, 6): "pico", (80, 8): "nano", (96, 9): "tiny",
              (96, 27): "small", (128, 27): "base", (192, 27): "large", (256, 27): "xlarge"}
_RESNETS = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101",
            (True, 36): "resnet152"}


def _cnn_from_shapes(state: dict[str, Tensor]) -> str | None:
    """The timm name of an official ConvNeXt (first width, blocks of stage 3) or torchvision ResNet
    (bottleneck or basic blocks, blocks of layer3) state dict; None for other layouts."""
    if "downsample_layers.0.0.weight" in state:
        blocks = len({key.split(".")[2] for key in state if key.startswith("stages.2.")})
        size = _CONVNEXTS.get((state["downsample_layers.0.0.weight"].shape[0], blocks))
        return f"convnext_{size}" if size else None
    if "layer3.0.conv1.weight" in state:
        blocks = len({key.split(".")[1] for key in state if key.startswith("layer3.")})
        return _RESNETS.get(("layer1.0.conv3.weight" in state, blocks))
    return None


def _arg(checkpoint: dict[str, Any], name: str) -> Any:
    """An official training argument (``args`` is an ``argparse.Namespace`` or a dict), or None."""
    args = checkpoint.get("args")
    return args.get(name) if isinstance(args, dict) else getattr(args, name, None)


def _backbone_from(checkpoint: dict[str, Any], state: dict[str, Tensor], kwargs: dict[str, Any]) -> None:
    """Fill ``backbone``/``backbone_kwargs`` from the official ``args.arch`` or the ViT shapes."""
    if "backbone" in kwargs:
        return
    guess = _vit_from_shapes(state)
    if guess is None and _cnn_from_shapes(state) is not None:
        guess = (_cnn_from_shapes(state), {})
    arch = _arg(checkpoint, "arch")
    if guess is None and arch is None:
        raise ValueError("cannot tell the backbone of this official checkpoint: pass backbone='<timm name>' "
                         "(and backbone_kwargs) to load_official")
    if guess is None:
        kwargs["backbone"] = arch
        return
    kwargs["backbone"] = guess[0]
    kwargs["backbone_kwargs"] = {**guess[1], **(kwargs.get("backbone_kwargs") or {})}


def _build(method: str, checkpoint: dict[str, Any], kwargs: dict[str, Any]) -> SSLModule:
    from ssl_modules.networks.backbones import backbone_state_dict
    kwargs = dict(kwargs)
    _backbone_from(checkpoint, backbone_state_dict(checkpoint), kwargs)
    if method == "cribo":
        from ssl_modules.methods.cribo import CrIBo
        student = {k.removeprefix("module."): v for k, v in checkpoint["student"].items()}
        widths = _linear_widths(student, "head.mlp.")
        defaults = dict(out_dim=student["head.last_layer.weight_v"].shape[0],
                        object_out_dim=student["head.last_layer_c.weight_v"].shape[0],
                        head_hidden_dim=widths[0], head_bottleneck_dim=widths[-1],
                        use_bn_in_head=_has_norm(student, "head.mlp."))
        if _arg(checkpoint, "norm_last_layer") is not None:  # not in the tensors: frozen g is a training choice
            defaults["norm_last_layer"] = bool(_arg(checkpoint, "norm_last_layer"))
        if isinstance(checkpoint.get("cpv_queue_cpu"), Tensor):
            slots = checkpoint["cpv_queue_cpu"].shape[0]
            defaults.update(queue_size=slots, num_clusters=checkpoint["centroids_queue_cpu"].shape[1] // slots)
        return CrIBo(**{**defaults, **kwargs})
    model = {k.replace("_orig_mod.", ""): v for k, v in checkpoint["model"].items()}
    if method == "bam":
        from ssl_modules.methods.bam import BAM
        prefix = "student.module.proj_head.projector." if any(k.startswith("student.") for k in model) \
            else "module.proj_head.projector."
        widths = _linear_widths(model, prefix)
        norm_keys = {k for k in model if k.startswith(prefix) and k.endswith(".running_mean")}
        last = f"{prefix}{max(int(k[len(prefix):].split('.')[0]) for k in model if k.startswith(prefix))}."
        last_bn = any(k.startswith(last) and k.endswith("running_mean") for k in model)
        hidden_bn = len(norm_keys) - int(last_bn) > 0
        defaults = dict(projector_widths="-".join(map(str, widths)), projector_norm="batch" if hidden_bn else "none",
                        projector_last_bn=last_bn, teacher=any(k.startswith("teacher.") for k in model))
        return BAM(**{**defaults, **kwargs})
    from ssl_modules.methods.vicregl import VICRegL
    expander = _linear_widths(model, "module.projector.")
    projector = _linear_widths(model, "module.maps_projector.")
    defaults: dict[str, Any] = {}
    if expander:
        defaults["expander_widths"] = "-".join(map(str, expander))
    if projector:
        defaults["projector_widths"] = "-".join(map(str, projector))
    if not projector:
        defaults["alpha"] = 1.0
    elif not expander:
        defaults["alpha"] = 0.0
    return VICRegL(**{**defaults, **kwargs})
