"""Any timm model -> uniform features: a global vector, dense tokens/cells and their grid.

ViTs give the pooled token (CLS, after the final norm) and the patch tokens; CNNs give the pooled last map
and its cells. Where a method's official code takes features differently from timm's defaults, the
difference is an explicit option here (``global_pool="cell_norm_mean"``, ``layer_scale=False``).
"""
from __future__ import annotations

import importlib
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from .contracts import Features

__all__ = ["Features", "Backbone", "is_vit_name", "disable_stochastic_layers"]

_VIT_MODULES = ("vision_transformer", "deit", "eva", "vision_transformer_hybrid", "vision_transformer_relpos")


def is_vit_name(name: str) -> bool:
    """Whether timm builds ``name`` as a Vision Transformer (patch tokens plus prefix tokens)."""
    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] in _VIT_MODULES


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

    Args:
        name: any timm model name (``vit_small_patch16_224``, ``resnet50``, ``convnext_small``, ...).
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
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if global_pool not in ("default", "cell_norm_mean", "dense_mean"):
            raise ValueError(f"global_pool must be 'default', 'cell_norm_mean' or 'dense_mean', got {global_pool!r}")
        self.name = name
        self.is_vit = is_vit_name(name)
        if self.is_vit:
            model_kwargs.setdefault("dynamic_img_size", True)
        if mocov3_vit and not self.is_vit:
            raise ValueError(f"mocov3_vit=True needs a ViT, {name} is not one")
        if mocov3_vit:
            model_kwargs.setdefault("weight_init", "moco")
        self.model_kwargs = dict(model_kwargs)
        self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
        if mocov3_vit:
            _make_mocov3_vit(self.model)
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

    def _stride(self) -> int:
        if self.is_vit:
            patch = self.model.patch_embed.patch_size
            return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        return int(self.model.feature_info[-1]["reduction"])

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
        if self.is_vit:
            return self._vit_features(images)
        return self._cnn_features(images)

    def _vit_features(self, images: Tensor) -> Features:
        tokens = self.model.forward_features(images)
        return self._features(tokens, tokens[:, self.num_prefix_tokens :], self.grid_size(*images.shape[-2:]))

    def _cnn_features(self, images: Tensor) -> Features:
        maps = self.model.forward_features(images)
        cells = self.model.head.norm(maps) if self.global_pool == "cell_norm_mean" else maps
        return self._features(maps, cells.flatten(2).transpose(1, 2), tuple(maps.shape[-2:]))

    def _features(self, trunk_output: Tensor, dense: Tensor, grid: tuple[int, int]) -> Features:
        """The global vector is the model's own pooling of the trunk's output, or the mean of the dense cells."""
        if self.global_pool == "default":
            return Features(self.model.forward_head(trunk_output, pre_logits=True), dense, grid)
        return Features(dense.mean(dim=1), dense, grid)

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
        if converter is not None and not self.is_vit:
            cleaned = converter(cleaned, self.model)
        classifier = ("fc.", "head.fc.", "head.weight", "head.bias")
        cleaned = {k: v for k, v in cleaned.items() if not k.startswith(classifier)}
        missing, unexpected = self.model.load_state_dict(cleaned, strict=False)
        if missing or unexpected:
            raise ValueError(f"official weights do not fit {self.name}: missing {missing}, unexpected {unexpected}")

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
