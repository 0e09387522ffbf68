"""Any timm model -> uniform features: a global vector, dense tokens/cells and their grid.

ViTs give the pooled token (CLS, after the final norm) and the patch tokens; CNNs give the pooled last map
and its cells. Where a method's official code takes features differently from timm's defaults, the
difference is an explicit option here (``global_pool="cell_norm_mean"``, ``layer_scale=False``).
"""
from __future__ import annotations

import difflib
import functools
import importlib
from pathlib import Path
from typing import Any, Literal, NamedTuple

import timm
import torch
from torch import Tensor, nn

from ssl_modules.contracts import Features

__all__ = ["Features", "Backbone", "is_vit_name", "is_vision_transformer_name", "disable_stochastic_layers",
           "check_model_name"]


def check_model_name(name: str) -> None:
    """Raise a clear error, with the closest timm names, when timm has no model called ``name``.

    Pretrained tags (``vit_small_patch16_224.dino``) are accepted: only the architecture part is looked up.
    """
    if timm.is_model(name):
        return
    architecture = name.split(".", 1)[0]
    close = difflib.get_close_matches(architecture, timm.list_models(), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "no timm name is close to it"
    raise ValueError(f"unknown backbone {name!r}: timm has no such model ({hint}); "
                     "timm.list_models('<pattern>') lists the names")


class _ModelKind(NamedTuple):
    """What ``timm.create_model(name)`` builds, found without building it (on the meta device)."""

    cls: type
    token_model: bool  # patch tokens after prefix tokens (ViT, DeiT, BEiT, EVA, ...): ``num_prefix_tokens``
    dynamic_img_size: bool  # the class takes ``dynamic_img_size`` (one model for crops of several sizes)


@functools.cache
def _model_kind(name: str) -> _ModelKind:
    check_model_name(name)
    try:
        with torch.device("meta"):  # no memory, no initialisation cost: only the class and its attributes
            probe = timm.create_model(name, pretrained=False, num_classes=0)
    except (NotImplementedError, RuntimeError):  # an initialiser that reads tensor values: build it for real
        probe = timm.create_model(name, pretrained=False, num_classes=0)
    return _ModelKind(type(probe), hasattr(probe, "num_prefix_tokens"), hasattr(probe, "dynamic_img_size"))


def is_vit_name(name: str) -> bool:
    """Whether timm builds ``name`` as a Vision Transformer: patch tokens after ``num_prefix_tokens``
    prefix (CLS, distillation, register) tokens — ViT, DeiT, BEiT, EVA, ... (Swin and CNNs are not)."""
    return _model_kind(name).token_model


def is_vision_transformer_name(name: str) -> bool:
    """Whether timm builds ``name`` as its ``VisionTransformer`` class (learned absolute position embedding
    and a patch projection: what ``mocov3_vit`` changes), not another token model such as BEiT or EVA."""
    return issubclass(_model_kind(name).cls, timm.models.VisionTransformer)


def disable_stochastic_layers(module: nn.Module) -> None:
    """Turn stochastic depth and dropout off in place (for EMA teachers, which the papers build without)."""
    for layer in module.modules():
        if isinstance(layer, timm.layers.DropPath):
            layer.drop_prob = 0.0
        elif isinstance(layer, nn.Dropout):
            layer.p = 0.0


def sincos_2d_position_embedding(height: int, width: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """MoCo v3's fixed 2-D sin-cos table ``(height * width, dim)``: sin/cos of x, then sin/cos of y."""
    if dim % 4:
        raise ValueError(f"the embedding width must be a multiple of 4 for a 2-D sin-cos table, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    out_x, out_y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1).float()


def _make_mocov3_vit(model: nn.Module) -> None:
    """MoCo v3's two ViT tricks: a fixed sin-cos position embedding and a frozen random patch projection."""
    grid = model.patch_embed.grid_size
    table = sincos_2d_position_embedding(grid[0], grid[1], model.embed_dim)
    with torch.no_grad():
        prefix = model.pos_embed.shape[1] - table.shape[0]  # CLS slot(s) in the table get zeros
        model.pos_embed.zero_()
        model.pos_embed[0, prefix:] = table
    model.pos_embed.requires_grad_(False)
    model.patch_embed.proj.requires_grad_(False)


def _strip_layer_scale(model: nn.Module) -> dict[str, int]:
    """Remove ConvNeXt's layer scale (``gamma``) from every block; returns ``{state-dict key: channels}`` of
    the removed parameters.

    ``timm.create_model(..., ls_init_value=None)`` does not do this: create_model drops keyword arguments
    whose value is None, so the blocks silently keep the default layer scale.
    """
    removed: dict[str, int] = {}
    for name, block in model.named_modules():
        gamma = getattr(block, "gamma", None)
        if isinstance(gamma, nn.Parameter):
            removed[f"{name}.gamma" if name else "gamma"] = gamma.numel()
            block.gamma = None
    return removed


class Backbone(nn.Module):
    """A timm model wrapped to return :class:`Features`.

    The dense maps come from timm's public ``forward_intermediates`` (the last block's output as an NCHW
    map, prefix tokens dropped, final norm applied), the global vector from the model's own head
    (``forward_head(..., pre_logits=True)``), so every timm family that has them works: ViT, DeiT, BEiT,
    EVA, Swin, ResNet, ConvNeXt, RegNet, EfficientNet, ... Where the model's final output is itself a map
    (CNNs, including EfficientNet's extra head convolution) the dense cells are that map.

    Args:
        name: any timm model name (``vit_small_patch16_224``, ``resnet50``, ``convnext_small``, ...). An
            unknown name is an error that lists the closest timm names.
        pretrained: load timm's pretrained weights (needs them in the local cache: there is no download
            here). Off by default: self-supervised pretraining starts from scratch.
        global_pool: ``"default"`` uses the model's own pooling (CLS token for ViTs, average pool for
            CNNs); ``"cell_norm_mean"`` applies the head's LayerNorm to every cell and averages the
            normalised cells, and the dense cells are the normalised ones (VICRegL's ConvNeXt features;
            timm pools first and normalises after, which gives different vectors); ``"dense_mean"`` is the mean
            of the dense features (for ViTs: the mean patch token after the final norm, instead of the CLS).
        layer_scale: ``False`` removes ConvNeXt's layer scale (VICRegL's ConvNeXt has none).
        mocov3_vit: ViT only: MoCo v3's fixed 2-D sin-cos position embedding, frozen patch projection and
            initialisation (``weight_init="moco"``), as BAM's official ViTs.
        cls_token_init: ``"timm"`` keeps timm's ``normal(std=1e-6)`` CLS token; ``"trunc_normal"`` draws it
            from a truncated normal of std 0.02, as the official DINO/CrIBo ViT does.
        weights: a file of weights to start from: an official backbone file or full official checkpoint
            (CrIBo, BAM, VICRegL layouts; the teacher's backbone where there is one), a state dict in timm's
            names (``export``'s ``backbone.pt``), loaded strictly (see :meth:`load_weights_file`).
        trust_checkpoint: read ``weights`` with full unpickling, for a file that holds types a weights-only
            read refuses (the trust rule of ``ssl_modules.checkpoints.reading``; it can run code from the file).
        **model_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``,
            ``drop_path_rate``, ...). ViTs get ``dynamic_img_size=True`` unless told otherwise, so that one
            model takes crops of several sizes.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        global_pool: Literal["default", "cell_norm_mean", "dense_mean"] = "default",
        layer_scale: bool = True,
        mocov3_vit: bool = False,
        cls_token_init: Literal["timm", "trunc_normal"] = "timm",
        weights: str | Path | None = None,
        trust_checkpoint: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if global_pool not in ("default", "cell_norm_mean", "dense_mean"):
            raise ValueError(f"global_pool must be 'default', 'cell_norm_mean' or 'dense_mean', got {global_pool!r}")
        if cls_token_init not in ("timm", "trunc_normal"):
            raise ValueError(f"cls_token_init must be 'timm' or 'trunc_normal', got {cls_token_init!r}")
        kind = _model_kind(name)
        self.name = name
        self.is_vit = kind.token_model
        if kind.dynamic_img_size:
            model_kwargs.setdefault("dynamic_img_size", True)
        if mocov3_vit and not is_vision_transformer_name(name):
            raise ValueError(f"mocov3_vit=True needs a timm VisionTransformer (vit_*), {name} is a {kind.cls.__name__}")
        if mocov3_vit:
            model_kwargs.setdefault("weight_init", "moco")
        self.model_kwargs = dict(model_kwargs)
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"timm's {kind.cls.__name__} ({name}) has no forward_intermediates, which the "
                             "dense features need; pick another model or a newer timm")
        if mocov3_vit:
            _make_mocov3_vit(self.model)
        self._init_cls_token(cls_token_init)
        self.global_pool = global_pool
        if global_pool == "cell_norm_mean" and not isinstance(
                getattr(self.model.get_submodule("head"), "norm", None), nn.Module):
            raise ValueError(f"global_pool='cell_norm_mean' needs a model with a head norm (ConvNeXt); {name} has none")
        self._removed_layer_scale = {} if layer_scale else _strip_layer_scale(self.model)
        if not layer_scale and not self._removed_layer_scale:
            raise ValueError(f"layer_scale=False: {name} has no layer-scale parameters to remove")
        self.layer_scale = layer_scale
        self.num_features: int = self.model.num_features
        self.stride: int = self._stride()
        if weights is not None:
            self.load_weights_file(weights, trust_checkpoint=trust_checkpoint)

    def _init_cls_token(self, how: str) -> None:
        if how == "timm":
            return
        cls_token = getattr(self.model, "cls_token", None)
        if not isinstance(cls_token, nn.Parameter):
            raise ValueError(f"cls_token_init={how!r}: {self.name} has no CLS token")
        nn.init.trunc_normal_(cls_token, std=0.02)

    def _stride(self) -> int:
        feature_info = getattr(self.model, "feature_info", None)
        if feature_info:
            return int(feature_info[-1]["reduction"])
        patch = self.model.patch_embed.patch_size
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self.model, "num_prefix_tokens", 0))

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The ``(h, w)`` feature grid of a crop of ``height x width`` pixels."""
        return height // self.stride, width // self.stride

    def check_input(self, images: Tensor) -> None:
        """Reject crops the model would silently truncate or cannot reduce to at least one cell."""
        height, width = images.shape[-2:]
        if height < self.stride or width < self.stride:
            raise ValueError(
                f"crops of {height}x{width} px are smaller than the stride {self.stride} of {self.name}: "
                f"use crops of at least {self.stride} px (or a model with a smaller patch/stride)"
            )
        if self.is_vit and (height % self.stride or width % self.stride):
            raise ValueError(
                f"crops of {height}x{width} px do not fit the patch size {self.stride} of {self.name}: "
                f"use crop sizes that are multiples of {self.stride}"
            )

    def forward(self, images: Tensor) -> Features:
        self.check_input(images)
        final, maps = self.model.forward_intermediates(images, indices=1, norm=True, output_fmt="NCHW")
        last_map = self._last_map(final, maps[-1])
        cells = self.model.head.norm(last_map) if self.global_pool == "cell_norm_mean" else last_map
        dense = cells.flatten(2).transpose(1, 2)
        if self.global_pool == "default":
            return Features(self.model.forward_head(final, pre_logits=True), dense, tuple(last_map.shape[-2:]))
        return Features(dense.mean(dim=1), dense, tuple(last_map.shape[-2:]))

    def _last_map(self, final: Tensor, last_block: Tensor) -> Tensor:
        """The dense NCHW map: the model's final output when that is already a map of the model's width
        (CNNs: EfficientNet's head convolution comes after the last block), else the last block's
        output that timm reshaped (ViT tokens without the prefix, Swin's NHWC)."""
        if (final.ndim == 4 and getattr(self.model, "output_fmt", "NCHW") == "NCHW"
                and final.shape[1] == self.num_features):
            return final
        if last_block.shape[1] != self.num_features:
            raise ValueError(f"{self.name}: the last block gives {last_block.shape[1]} channels, the model's "
                             f"pooled feature {self.num_features}; its dense maps are not supported")
        return last_block

    def load_official_weights(self, state_dict: dict[str, Tensor], prefixes: tuple[str, ...] = ()) -> None:
        """Load weights saved by a method's official code (their key layout, not timm's).

        Leading ``prefixes`` (e.g. ``"module."``, ``"backbone."``, ``"teacher."``) are removed, timm's own
        converter of the model family maps the official names (ConvNeXt: ``downsample_layers`` ->
        ``stem``/``stages``, final ``norm`` -> ``head.norm``; ResNets and ViTs need none), and the load is
        strict except for classifier weights, which self-supervised backbones do not have.
        """
        cleaned = {}
        for key, value in state_dict.items():
            for prefix in prefixes:
                key = key.removeprefix(prefix)
            cleaned[key] = value
        converter = getattr(importlib.import_module(type(self.model).__module__), "checkpoint_filter_fn", None)
        if converter is not None and (not self.is_vit or not _fits(self.model, cleaned)):
            # ViTs in timm's own names load as they are; other layouts (DINOv2's official names, a position
            # embedding of another size) go through timm's converter of the family, which resamples it.
            cleaned = converter(cleaned, self.model)
        classifier = ("fc.", "head.fc.", "head.weight", "head.bias")
        cleaned = {k: v for k, v in cleaned.items() if not k.startswith(classifier)}
        for key in self._removed_layer_scale:  # identity layer scales (timm_state_dict's) of a model without
            if key in cleaned and bool((cleaned[key] == 1).all()):
                del cleaned[key]
        missing, unexpected = self.model.load_state_dict(cleaned, strict=False)
        if missing or unexpected:
            raise ValueError(f"official weights do not fit {self.name}: missing {missing}, unexpected {unexpected}")

    def load_weights_file(self, path: str | Path, trust_checkpoint: bool = False) -> None:
        """Load a file of backbone weights: an official release (CrIBo, BAM and VICRegL backbone files),
        a full official training checkpoint (the teacher's backbone where there is one), a Lightning
        checkpoint of this library, or ``export``'s ``backbone.pt``. The load is strict (see
        :meth:`load_official_weights`); an error names the file. The file is read under the trust rule
        (``ssl_modules.checkpoints.reading``): ``trust_checkpoint=True`` only for a file from a source you trust."""
        from ssl_modules.checkpoints.reading import read_checkpoint  # the one reader; it imports no method

        state = read_checkpoint(path, trust_checkpoint=trust_checkpoint, lightning=False)
        try:
            self.load_official_weights(backbone_state_dict(state))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """``({parameter name: layer}, number of layers)`` in timm's fine grouping (``group_matcher``): 0 is the
        stem (patch embedding, position embedding, CLS and register tokens; a CNN's first convolution), then one
        layer per block in depth order; the final norm is the last layer. Names are this module's
        (``model.blocks.0.attn.qkv.weight``). Layer-wise learning-rate decay and ``freeze_blocks`` use it."""
        if not hasattr(self.model, "group_matcher"):
            raise ValueError(f"{self.name}: timm gives no layer grouping (group_matcher) for this model, which "
                             "layer_decay and freeze_blocks need; use a ViT, ResNet or ConvNeXt")
        grouping = timm.models.group_parameters(self.model, self.model.group_matcher(coarse=False), reverse=True)
        count = max(grouping.values()) + 1
        return {f"model.{name}": layer for name, layer in grouping.items()}, count

    def timm_state_dict(self) -> dict[str, Tensor]:
        """The weights as ``timm.create_model(name, num_classes=0, **model_kwargs)`` names them.

        A model built with ``layer_scale=False`` gets its removed layer scales back as ones (the identity), so
        that timm's model, which always has them, loads the weights strictly and computes the same blocks.
        """
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        reference = next(iter(state.values()), None)
        for key, channels in self._removed_layer_scale.items():
            state[key] = torch.ones(channels, dtype=reference.dtype if reference is not None else None,
                                    device=reference.device if reference is not None else None)
        return state


def _fits(model: nn.Module, state: dict[str, Tensor]) -> bool:
    """Whether ``state`` has exactly ``model``'s parameter and buffer names and shapes (classifier aside)."""
    own = {k: v.shape for k, v in model.state_dict().items()}
    given = {k: v.shape for k, v in state.items() if not k.startswith(("fc.", "head.fc.", "head.weight", "head.bias"))}
    return own == given


# Where the backbone sits in each layout, most specific first: the teacher wherever there is one.
_BACKBONE_PREFIXES = (
    "teacher.backbone.model.", "backbone.model.",  # this library's Lightning checkpoints
    "teacher.module.backbone.", "teacher.backbone.",  # BAM's wrapper (``model``), CrIBo's ``teacher``
    "student.module.backbone.", "module.backbone.", "backbone.",  # BAM without teacher, VICRegL, CrIBo student
)


def backbone_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The backbone's state dict inside any of the checkpoint layouts :meth:`Backbone.load_weights_file`
    reads, with the layout's prefixes (and ``module.``/``_orig_mod.`` wrappers) removed."""
    for entry in ("teacher", "state_dict", "model"):  # CrIBo / Lightning / BAM and VICRegL
        if isinstance(checkpoint.get(entry), dict):
            checkpoint = checkpoint[entry]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found (top-level keys: {sorted(checkpoint)[:10]})")
    tensors = {_strip_wrappers(k): v for k, v in tensors.items()}
    for prefix in _BACKBONE_PREFIXES:
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if part:
            return part
    return tensors  # a bare backbone state dict (released weights, export)


def _strip_wrappers(key: str) -> str:
    """Remove ``torch.compile``'s ``_orig_mod.`` and a leading DDP ``module.`` that wraps a whole model."""
    key = key.replace("_orig_mod.", "")
    return key.removeprefix("module.") if key.startswith("module.module.") else key
