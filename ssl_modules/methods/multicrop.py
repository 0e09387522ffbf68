"""Encode a list of crops of several resolutions with as few backbone calls as the method allows."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ssl_modules.networks.backbones import Features

__all__ = ["encode_views", "resolution_groups"]


def resolution_groups(crops: Sequence[Tensor]) -> list[list[int]]:
    """Indices of consecutive crops that share a shape (global crops, then local crops, ...)."""
    groups: list[list[int]] = []
    for i, crop in enumerate(crops):
        if groups and crops[groups[-1][0]].shape == crop.shape:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def encode_views(
    encoder: Callable[[Tensor], Features], crops: Sequence[Tensor], per_view: bool = False
) -> list[Features]:
    """The features of every crop, with one ``encoder`` call per resolution group, or per view.

    Models without batch statistics (ViTs, LayerNorm CNNs) give the same features either way, and
    concatenating is faster. With BatchNorm, grouping changes the statistics, so the method's official
    grouping is followed (VICRegL: ``per_view=True``).
    """
    if not crops:
        raise ValueError("encode_views needs at least one crop")
    batch = crops[0].shape[0]
    if any(c.shape[0] != batch for c in crops):
        raise ValueError(f"all views must have the same batch size, got {[c.shape[0] for c in crops]}")
    groups = [[i] for i in range(len(crops))] if per_view else resolution_groups(crops)
    out: list[Features] = []
    for group in groups:
        feats = encoder(torch.cat([crops[i] for i in group]) if len(group) > 1 else crops[group[0]])
        for global_, dense in zip(feats.global_.split(batch), feats.dense.split(batch)):
            out.append(Features(global_, dense, feats.grid))
    return out
