"""Feature extraction shared by the protocols: sharded between processes, gathered in dataset order,
float32 unless told otherwise, with a progress bar, and cached so that protocols reading the same
features (e.g. ``knn`` and ``linear``'s validation set) embed once.

Processes split a set by whole batches (batch ``b`` goes to process ``b % world``), so every batch holds
the same images as in a one-process run and the gathered features are the same bits.
"""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Backbone, Features
from ssl_modules.run.distributed import gather_in_index_order

__all__ = ["Extractor", "FeatureCache", "batches_of", "global_vector", "dense_map", "progress"]

Selector = Callable[[Features], Tensor]


def global_vector(features: Features) -> Tensor:
    """The pooled vector ``(B, C)`` (CLS token for ViTs, pooled map for CNNs)."""
    return features.global_.float()


def dense_map(features: Features) -> Tensor:
    """The dense features as maps ``(B, C, h, w)``."""
    batch, tokens, channels = features.dense.shape
    return features.dense.float().transpose(1, 2).reshape(batch, channels, *features.grid).contiguous()


def batches_of(count: int, batch_size: int) -> list[list[int]]:
    """``range(count)`` cut in order into batches of ``batch_size``."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def progress(iterable: Any, total: int | None, desc: str, enabled: bool) -> Any:
    """A tqdm bar on process 0 when ``enabled``, else the iterable itself."""
    if not enabled or distributed.rank() != 0:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


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
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda")

    def my_batches(self, count: int) -> list[list[int]]:
        """This process's batches of a set of ``count`` items."""
        return batches_of(count, self.batch_size)[distributed.rank():: distributed.world_size()]

    def extract(self, dataset: Dataset, select: Selector, key: str | None = None,
                desc: str = "features") -> tuple[Tensor, Tensor]:
        """``(features, targets)`` of the whole set on every process, in dataset order (cached by ``key``)."""
        def compute() -> tuple[Tensor, Tensor]:
            return self._extract(dataset, select, desc)
        if key is None:
            return compute()
        return self.cache.get(key, compute, self.fingerprint)

    def _extract(self, dataset: Dataset, select: Selector, desc: str) -> tuple[Tensor, Tensor]:
        batches = self.my_batches(len(dataset))
        rows, targets, index = [], [], []
        for batch, (images, target) in zip(batches, progress(self.loader(dataset, batches or [[0]]),
                                                               len(batches), desc, self.show_progress)):
            rows.append(select(self.embed(images)).float())
            targets.append(torch.as_tensor(target).to(self.device))
            index.append(torch.tensor(batch, dtype=torch.long, device=self.device))
        if not batches:  # more processes than batches: learn the shapes from one image, contribute no rows
            images, target = next(iter(self.loader(dataset, [[0]])))
            rows = [select(self.embed(images)).float()[:0]]
            targets = [torch.as_tensor(target).to(self.device)[:0]]
            index = [torch.zeros(0, dtype=torch.long, device=self.device)]
        _, features, labels = gather_in_index_order(torch.cat(index), torch.cat(rows), torch.cat(targets))
        return features, labels
