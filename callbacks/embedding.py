"""Embedding evaluation sets through ``pl_module.embed`` and gathering the features of every process.

Probes read the backbone only through ``embed(images) -> Features`` (the teacher where there is one, eval
mode, no gradient). Each process embeds its shard of whole batches (``callbacks.data``); ``gather_in_index_order``
(from ``ssl_modules.run.distributed``, re-exported here) then gives every process all rows in dataset-index order,
the order of a single-process run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Features
from ssl_modules.run.distributed import gather_in_index_order

from .data import shard_batches, sharded_loader
from .progress import probe_progress

__all__ = [
    "FeatureSelector",
    "global_features",
    "dense_maps",
    "dense_tokens",
    "require_embed",
    "embed_images",
    "embed_shard",
    "gather_in_index_order",
    "broadcast_module_",
    "trainable_context",
]

FeatureSelector = Callable[[Features], Tensor]


def global_features(features: Features) -> Tensor:
    """The pooled vectors ``(B, C)`` in float32."""
    return features.global_.float()


def dense_maps(features: Features) -> Tensor:
    """The dense features as contiguous maps ``(B, C, h, w)`` in float32 (tokens are row-major, ``N = h * w``).

    Contiguous on purpose: the transposed view would be channels-last, and convolutions and BatchNorm sum
    in another order on that layout, so heads trained on gathered (contiguous) features would differ.
    """
    batch, tokens, channels = features.dense.shape
    height, width = features.grid
    if height * width != tokens:
        raise ValueError(f"embed() returned {tokens} dense tokens for a grid {features.grid}; they must match")
    return features.dense.float().transpose(1, 2).reshape(batch, channels, height, width).contiguous()


def dense_tokens(features: Features) -> Tensor:
    """The dense tokens ``(B, N, C)`` in float32."""
    return features.dense.float()


def require_embed(probe: str, pl_module: pl.LightningModule) -> None:
    """A clear error when the module has no ``embed(images) -> Features`` (every ``SSLModule`` has one)."""
    if not callable(getattr(pl_module, "embed", None)):
        raise TypeError(f"{probe} reads features through `pl_module.embed(images) -> Features`; "
                        f"{type(pl_module).__name__} has no `embed` method (subclass ssl_modules.SSLModule, "
                        "or define `embed` returning ssl_modules.Features)")


def embed_images(trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor) -> Features:
    """``pl_module.embed`` of ``images`` on the module's device, under the trainer's precision (autocast)."""
    with trainer.precision_plugin.forward_context():
        return pl_module.embed(images.to(pl_module.device, non_blocking=True))


@torch.no_grad()
def embed_shard(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    dataset: Dataset,
    chunks: Sequence[list[int]],
    select: FeatureSelector,
    num_workers: int = 0,
    desc: str = "probe features",
) -> tuple[Tensor, Tensor, Tensor]:
    """Features, targets and dataset indices of this process's batches ``chunks[rank::world_size]``.

    Returns tensors on the module's device. A process without a batch returns zero rows of the right shapes
    (it embeds the set's first image to learn them), so that gathering works on every process.
    """
    mine = shard_batches(chunks, distributed.rank(), distributed.world_size())
    batches = mine or [chunks[0][:1]]
    features, targets = [], []
    for images, target in probe_progress(trainer, sharded_loader(dataset, batches, num_workers), len(batches), desc):
        features.append(select(embed_images(trainer, pl_module, images)))
        targets.append(torch.as_tensor(target).to(pl_module.device))
    index = torch.tensor([i for batch in batches for i in batch], dtype=torch.long, device=pl_module.device)
    if not mine:
        return features[0][:0], targets[0][:0], index[:0]
    return torch.cat(features), torch.cat(targets), index


@torch.no_grad()
def broadcast_module_(module: nn.Module, source: int = 0) -> None:
    """Copy ``source``'s parameters and buffers into every process's ``module`` (no-op when not distributed).

    The probes' identical updates already give identical heads; this removes the last bits of difference
    non-deterministic kernels (e.g. CUDA's bilinear upsampling backward) could leave.
    """
    distributed.broadcast_([tensor.data for tensor in [*module.parameters(), *module.buffers()]], source)


@contextlib.contextmanager
def trainable_context() -> Iterator[None]:
    """Gradients on and inference mode off, whatever the caller's loop set (``trainer.validate`` runs its
    hooks under ``torch.inference_mode``; a probe that trains a head needs autograd there)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
