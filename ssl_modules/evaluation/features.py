"""Feature extraction shared by the protocols and the online probes: sharded between processes by whole batches
(``ssl_modules.evaluation.batches``), gathered in dataset order, float32, with a progress bar; ``Extractor`` adds
the protocols' frozen backbone, precision and a cache, so that protocols reading the same features (e.g.
``knn`` and ``linear``'s validation set) embed once.
"""
from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_modules.evaluation.batches import batch_chunks, shard_batches, sharded_loader
from ssl_modules.networks.backbones import Backbone, Features
from ssl_modules.run import distributed
from ssl_modules.run.distributed import gather_in_index_order

__all__ = ["Extractor", "FeatureCache", "FeatureSelector", "global_vector", "dense_map", "own_storage", "progress",
           "extract_shard"]

#: which features of a batch to keep: ``Features -> Tensor``
FeatureSelector = Callable[[Features], Tensor]
#: ``(iterable, total) -> iterable``, e.g. wrapped in a progress bar
Progress = Callable[[Iterable[Any], int], Iterable[Any]]


def own_storage(tensor: Tensor) -> Tensor:
    """``tensor`` itself when it is contiguous and its storage holds nothing else, else a compact copy.

    A ViT's CLS vector is a view of the final ``(B, 1 + N, C)`` tokens: kept as it is, every stored batch
    would keep all its tokens alive (what DINO's ``eval_knn.py`` avoids with ``model(samples).clone()``).
    """
    exact = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and tensor.storage_offset() == 0 and exact:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def global_vector(features: Features) -> Tensor:
    """The pooled vectors ``(B, C)`` in float32 (CLS token for ViTs, pooled map for CNNs), in their own
    storage (``own_storage``)."""
    return own_storage(features.global_.float())


def dense_map(features: Features) -> Tensor:
    """The dense features as contiguous maps ``(B, C, h, w)`` in float32 (tokens are row-major, ``N = h * w``).

    Contiguous on purpose: the transposed view would be channels-last, and convolutions and BatchNorm sum
    in another order on that layout, so heads trained on gathered (contiguous) features would differ. In their
    own storage, as ``global_vector``.
    """
    batch, tokens, channels = features.dense.shape
    height, width = features.grid
    if height * width != tokens:
        raise ValueError(f"the backbone returned {tokens} dense tokens for a grid {features.grid}; they must match")
    return own_storage(features.dense.float().transpose(1, 2).reshape(batch, channels, height, width))


def progress(iterable: Iterable[Any], total: int | None, desc: str, enabled: bool = True,
             position: int | None = None) -> Iterable[Any]:
    """A transient tqdm bar over ``iterable`` on process 0 when ``enabled``, else the iterable itself.

    ``position`` puts the bar on that line, below another one (a Lightning trainer's bar, which writes to
    stdout; the bar then does too).
    """
    if not enabled or distributed.rank() != 0:
        return iterable
    from tqdm.auto import tqdm

    placement = {} if position is None else {"position": position, "file": sys.stdout}
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, **placement)


@torch.no_grad()
def extract_shard(embed: Callable[[Tensor], Features], dataset: Dataset, chunks: Sequence[list[int]],
                  select: FeatureSelector, device: torch.device, num_workers: int = 0,
                  pin_memory: bool | None = None, bar: Progress | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Features, targets and dataset indices of this process's batches ``chunks[rank::world_size]``, on ``device``.

    A process without a batch returns zero rows of the right shapes (it embeds the first image of ``chunks``
    to learn them), so that gathering works on every process.
    """
    mine = shard_batches(chunks)
    batches = mine or [chunks[0][:1]]
    rows = sum(len(batch) for batch in batches)
    loader = sharded_loader(dataset, batches, num_workers, pin_memory=pin_memory)
    features = targets = None
    start = 0
    for images, target in (bar(loader, len(batches)) if bar is not None else loader):
        selected, target = select(embed(images)), torch.as_tensor(target).to(device)
        if features is None:  # one matrix of all rows, filled batch by batch: no list of batches, no cat
            features = selected.new_empty((rows, *selected.shape[1:]))
            targets = target.new_empty((rows, *target.shape[1:]))
        features[start:start + len(selected)] = selected
        targets[start:start + len(selected)] = target
        start += len(selected)
    index = torch.tensor([i for batch in batches for i in batch], dtype=torch.long, device=device)
    if not mine:
        return features[:0], targets[:0], index[:0]
    return features, targets, index


@dataclass
class FeatureCache:
    """Features already extracted in this evaluation, by key; with ``folder``, also on disk (the key hashed
    with the backbone's weights, so a changed model never reads stale features)."""

    folder: Path | None = None
    entries: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)

    def get(self, key: str, compute: Callable[[], tuple[Tensor, ...]], fingerprint: str) -> tuple[Tensor, ...]:
        if key in self.entries:
            return self.entries[key]
        path = None
        if self.folder is not None:
            digest = hashlib.sha1(f"{fingerprint}|{key}|{distributed.world_size()}".encode()).hexdigest()[:16]
            path = Path(self.folder) / f"features-{digest}.pt"
            if path.is_file():
                self.entries[key] = tuple(torch.load(path, map_location="cpu", weights_only=True))
                return self.entries[key]
        value = compute()
        self.entries[key] = value
        if path is not None and distributed.rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save([t.cpu() for t in value], path)
        return value


class Extractor:
    """Embeds data sets with a frozen backbone.

    Args:
        backbone: the frozen backbone.
        device: where to run it.
        precision: ``"32"`` (float32, the protocols' default), ``"bf16"`` or ``"16"`` (autocast).
        batch_size: images per batch and process.
        num_workers: loader workers per process.
        show_progress: tqdm bars on process 0.
        cache: shared feature cache.
    """

    def __init__(self, backbone: Backbone, device: torch.device | str = "cpu", precision: str = "32",
                 batch_size: int = 64, num_workers: int = 0, show_progress: bool = True,
                 cache: FeatureCache | None = None) -> None:
        if precision not in ("32", "bf16", "16"):
            raise ValueError(f"precision={precision!r}; use '32' (float32), 'bf16' or '16'")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.precision, self.batch_size, self.num_workers = precision, batch_size, num_workers
        self.show_progress = show_progress
        self.cache = cache if cache is not None else FeatureCache()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """A hash of the backbone's name and weights."""
        if self._fingerprint is None:
            digest = hashlib.sha1(self.backbone.name.encode())
            for key, tensor in sorted(self.backbone.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.precision == "32":
            yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    @torch.no_grad()
    def embed(self, images: Tensor) -> Features:
        """Features of one batch under the extractor's precision."""
        with self.autocast():
            return self.backbone(images.to(self.device, non_blocking=True))

    def loader(self, dataset: Dataset, batches: list[list[int]]) -> DataLoader:
        """A loader of exactly ``batches`` (lists of dataset indices), in order."""
        return sharded_loader(dataset, batches, self.num_workers, pin_memory=self.device.type == "cuda")

    def my_batches(self, count: int) -> list[list[int]]:
        """This process's batches of a set of ``count`` items."""
        return shard_batches(batch_chunks(range(count), self.batch_size))

    def progress(self, iterable: Iterable[Any], total: int | None, desc: str) -> Iterable[Any]:
        """``iterable`` in a bar on process 0 when the extractor shows progress."""
        return progress(iterable, total, desc, self.show_progress)

    def extract(self, dataset: Dataset, select: FeatureSelector, key: str | None = None,
                desc: str = "features") -> tuple[Tensor, Tensor]:
        """``(features, targets)`` of the whole set on every process, in dataset order (cached by ``key``)."""
        def compute() -> tuple[Tensor, Tensor]:
            return self._extract(dataset, select, desc)
        if key is None:
            return compute()
        return self.cache.get(key, compute, self.fingerprint)

    def _extract(self, dataset: Dataset, select: FeatureSelector, desc: str) -> tuple[Tensor, Tensor]:
        rows, targets, index = extract_shard(self.embed, dataset, batch_chunks(range(len(dataset)), self.batch_size),
                                             select, self.device, self.num_workers, self.device.type == "cuda",
                                             lambda loader, total: self.progress(loader, total, desc))
        if not distributed.is_distributed():
            return rows, targets  # one process reads every batch in order: already in dataset order
        _, features, labels = gather_in_index_order(index, rows, targets)
        return features, labels
