"""Projection heads: MLP projector/expander, DINO-style head, and a per-cell local projector."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.functional.precision import at_least_float32

__all__ = ["MLP", "NormalizedLinear", "DINOHead", "LocalProjector", "parse_widths"]

Norm = Literal["batch", "layer", "none"]
Activation = Literal["relu", "gelu"]


def parse_widths(widths: str | Sequence[int]) -> list[int]:
    """``"8192-8192-8192"`` (the official VICRegL spelling) or ``[8192, 8192, 8192]`` -> a list of ints."""
    if isinstance(widths, str):
        widths = [int(w) for w in widths.split("-") if w]
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"head widths must be positive integers, got {widths!r}")
    return widths


def _norm_layer(norm: Norm, width: int, affine: bool = True) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm1d(width, affine=affine)
    if norm == "layer":
        return nn.LayerNorm(width, elementwise_affine=affine)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch', 'layer' or 'none', got {norm!r}")


def _activation(name: Activation) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")


class MLP(nn.Sequential):
    """``Linear -> Norm -> Activation`` for every hidden layer, then a last ``Linear``.

    Args:
        in_dim: input width.
        widths: output widths of the layers; the last one is the output width.
        norm: normalisation after every hidden layer (``"batch"``, ``"layer"`` or ``"none"``).
        activation: ``"relu"`` or ``"gelu"``.
        hidden_bias: bias in the hidden linear layers.
        last_bias: bias in the last linear layer.
        last_norm: ``"batch_nonaffine"`` adds a BatchNorm without affine parameters after the last layer
            (BAM's default projector without teacher).
        init: ``"default"`` (PyTorch's) or ``"trunc_normal"`` (std 0.02, zero biases: DINO/BAM).

    Inputs of shape ``(..., in_dim)`` are accepted; leading dims are flattened around the layers so that
    BatchNorm statistics span all rows (e.g. all cells of all images for a local projector).
    """

    def __init__(
        self,
        in_dim: int,
        widths: str | Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        hidden_bias: bool = True,
        last_bias: bool = True,
        last_norm: Literal["none", "batch_nonaffine"] = "none",
        init: Literal["default", "trunc_normal"] = "default",
    ) -> None:
        widths = parse_widths(widths)
        layers: list[nn.Module] = []
        dims = [in_dim, *widths]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(widths) - 1
            layers.append(nn.Linear(d_in, d_out, bias=last_bias if last else hidden_bias))
            if not last:
                layers += [_norm_layer(norm, d_out), _activation(activation)]
        if last_norm == "batch_nonaffine":
            layers.append(nn.BatchNorm1d(widths[-1], affine=False))
        elif last_norm != "none":
            raise ValueError(f"last_norm must be 'none' or 'batch_nonaffine', got {last_norm!r}")
        super().__init__(*layers)
        self.out_dim = widths[-1]
        if init == "trunc_normal":
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)
        elif init != "default":
            raise ValueError(f"init must be 'default' or 'trunc_normal', got {init!r}")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_dim)


class LocalProjector(MLP):
    """An :class:`MLP` applied independently to every cell of a dense map ``(B, N, C) -> (B, N, E)``.

    With BatchNorm the statistics span all ``B * N`` cells of the call, as in the official VICRegL.
    """


class NormalizedLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: ``W = g * v / ||v||`` per output row.

    The names ``weight_g`` / ``weight_v`` follow the official DINO-family checkpoints. ``g`` starts at 1;
    with ``norm_last_layer=True`` it is frozen at 1 (the layer is then a cosine classifier). ``v`` starts
    as an ``nn.Linear`` weight (kaiming-uniform with ``a = sqrt(5)``, i.e. uniform in
    ``+-1/sqrt(in_dim)``, row norm ``1/sqrt(3) = 0.577``): the official DINO/CrIBo heads wrap an
    ``nn.Linear`` created after their trunc-normal init ran, so its default init is what they train from.
    """

    def __init__(self, in_dim: int, out_dim: int, norm_last_layer: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """DINO-style head: MLP -> l2-normalised bottleneck -> weight-normalised prototypes.

    Args:
        in_dim: backbone width.
        out_dim: number of prototypes (65536 in DINO/CrIBo).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: bottleneck width (256).
        num_layers: linear layers of the MLP (3).
        use_bn: BatchNorm in the MLP's hidden layers.
        norm_last_layer: freeze the prototype norms at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        widths = [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        self.mlp = MLP(in_dim, widths, norm="batch" if use_bn else "none", activation="gelu", init="trunc_normal")
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim, norm_last_layer)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The l2-normalised bottleneck, normalised in at least float32 and returned in the MLP's dtype.

        CUDA autocast runs ``F.normalize`` in float32 (PyTorch's AMP op reference), so under the official fp16
        training an all-zero row (CrIBo's padding objects) stays 0; CPU autocast keeps ``F.normalize`` in
        float16, where its ``eps`` (1e-12) underflows and the row becomes 0/0 = NaN (its gradient too, so a
        GradScaler skips every step). Normalising in float32 gives the CUDA result on every device; the next
        layer casts to the autocast dtype anyway.
        """
        hidden = self.mlp(x)
        return F.normalize(at_least_float32(hidden), dim=-1).to(hidden.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))
