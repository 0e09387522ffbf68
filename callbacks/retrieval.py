"""``DenseRetrievalProbe``: in-context scene understanding by patch retrieval (Hummingbird; CrIBo's headline)."""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_modules import distributed

from .data import batch_chunks, fixed_subset, sharded_loader
from .embedding import dense_maps, embed_images, embed_shard, gather_in_index_order
from .metrics import IGNORE_INDEX, compute_all, mean_iou, update_all
from .probe import Probe
from .search import FlatIndex, SearchBackend
from .segmentation import upsample_logits

__all__ = ["DenseRetrievalProbe", "patch_label_distributions", "retrieval_label_scores", "sample_patches"]


def patch_label_distributions(masks: Tensor, grid: tuple[int, int], num_classes: int) -> Tensor:
    """The class distribution of every patch's pixels, ``(B, h * w, num_classes)`` (row-major patches).

    Pixels labelled 255 are left out; a patch with no labelled pixel gets all zeros. Patches are the cells of
    an adaptive average pooling of the mask to ``grid`` (exact patches when the mask side is a multiple).
    """
    labelled = masks != IGNORE_INDEX
    one_hot = F.one_hot(torch.where(labelled, masks.long(), num_classes), num_classes + 1)[..., :num_classes]
    fractions = F.adaptive_avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), grid)
    totals = fractions.sum(dim=1, keepdim=True)
    distributions = torch.where(totals > 0, fractions / totals.clamp(min=1e-12), torch.zeros_like(fractions))
    return distributions.flatten(2).transpose(1, 2)


def retrieval_label_scores(similarities: Tensor, neighbour_labels: Tensor, temperature: float) -> Tensor:
    """Label distribution of every query ``(Q, K)``: the neighbours' distributions ``(Q, k, K)`` averaged
    with weights ``softmax(similarities / temperature)`` over the ``k`` neighbours."""
    weights = torch.softmax(similarities.float() / temperature, dim=1)
    return torch.bmm(weights[:, None, :], neighbour_labels.float())[:, 0]


def sample_patches(labelled: Tensor, count: int | None, seed: int) -> Tensor:
    """Indices (ascending) of at most ``count`` labelled patches of one image, chosen with ``seed``;
    all labelled patches when ``count`` is ``None``."""
    candidates = labelled.nonzero().flatten()
    if count is None or candidates.numel() <= count:
        return candidates
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(candidates.numel(), generator=generator)[:count]
    return candidates[chosen.to(candidates.device)].sort().values


class DenseRetrievalProbe(Probe):
    """Dense nearest-neighbour retrieval ("in-context scene understanding", Balazevic et al. 2023), mIoU.

    Every ``every_n_epochs`` epochs (and after the last one, and on ``trainer.validate``):

    1. memory: the l2-normalised patch features (``pl_module.embed(...).dense``) of a fixed, seeded
       ``train_fraction`` of ``data.segmentation_dataset("train", image_size)``, each with its patch label —
       the class distribution of the patch's pixels, 255 left out (patches without labelled pixels are
       dropped; ``patches_per_image`` keeps a seeded random subset of each image's patches);
    2. each validation patch retrieves its ``k`` most cosine-similar memory entries (faiss for large
       memories) and takes their labels averaged with weights ``softmax(sim / temperature)``;
    3. the patch class scores are upsampled bilinearly to the mask size, argmax, and the mean IoU is logged as
       ``probe/<name>_miou`` (torchmetrics, 255 ignored).

    Unlike the offline protocol (CrIBo paper: augmented memory images, 512 px, up to 10^7 entries), the memory
    images use the DataModule's eval transform and the memory is as large as the subset, to stay cheap.

    Under DDP each process embeds a shard of the memory images; the memory is gathered (in image order) on
    every process, each process labels its own validation shard, and the IoU counts are summed, so every
    process logs the single-process value.

    Args:
        k: neighbours per validation patch (30 in open-hummingbird-eval).
        temperature: softmax temperature of the neighbour weights.
        every_n_epochs: evaluate after every ``every_n_epochs``-th epoch (0: only after the last one).
        train_fraction: fraction of the training images in the memory (CrIBo reports 1/128, 1/64, 1/8, 1).
        max_train_images: cap on the memory images; ``None`` for no cap.
        patches_per_image: patches kept per memory image (seeded); ``None`` keeps every labelled patch.
        max_val_images: validation images (a fixed random subset); ``None`` for all.
        image_size: side of the probe's images (``None``: the DataModule's ``eval_size``).
        batch_size: images per embedding batch and process.
        backend: nearest-neighbour search: ``"faiss"``, ``"torch"`` or ``"auto"`` (torch on accelerators
            and for small memories).
        num_workers: loader workers per process.
        data: segmentation DataModule (``num_seg_classes``, ``segmentation_dataset(split, size)``); ``None``:
            the trainer's.
        seed: seed of the subsets and of the patch sampling.
        name: metric prefix (``probe/<name>_miou``) and checkpoint key.
    """

    data_kind = "segmentation"

    def __init__(
        self,
        k: int = 30,
        temperature: float = 0.02,
        every_n_epochs: int = 1,
        train_fraction: float = 1.0,
        max_train_images: int | None = 1000,
        patches_per_image: int | None = None,
        max_val_images: int | None = 500,
        image_size: int | None = None,
        batch_size: int = 16,
        backend: SearchBackend = "auto",
        num_workers: int = 4,
        data: pl.LightningDataModule | None = None,
        seed: int = 0,
        name: str = "retrieval",
    ) -> None:
        super().__init__(name, every_n_epochs, data, seed)
        if k < 1 or temperature <= 0 or batch_size < 1:
            raise ValueError(f"k={k} and batch_size={batch_size} must be >= 1 and temperature={temperature} > 0")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction={train_fraction} must lie in (0, 1]")
        if patches_per_image is not None and patches_per_image < 1:
            raise ValueError(f"patches_per_image={patches_per_image} must be >= 1 or None (every patch)")
        if backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"backend={backend!r}; use 'auto', 'faiss' or 'torch'")
        self.k, self.temperature, self.backend = k, temperature, backend
        self.train_fraction, self.max_train_images = train_fraction, max_train_images
        self.patches_per_image, self.max_val_images, self.image_size = patches_per_image, max_val_images, image_size
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        features, labels = self.build_memory(trainer, pl_module)
        return {"miou": self.validation_miou(trainer, pl_module, FlatIndex(features, self.backend), labels)}

    # --------------------------------------------------------------------------------- memory
    def build_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        """Memory features ``(M, C)`` (l2-normalised) and patch labels ``(M, K)`` of every process, in image
        order."""
        train_set = self.probe_data.segmentation_dataset("train", self.image_size)
        subset = fixed_subset(len(train_set), self.train_fraction, self.max_train_images, self.seed)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the segmentation training set is empty; no memory to build")
        maps, masks, index = embed_shard(trainer, pl_module, train_set, batch_chunks(subset, self.batch_size),
                                         dense_maps, self.num_workers)
        features, labels, owner = self.memory_entries(maps, masks, index)
        _, features, labels = gather_in_index_order(owner, features, labels)
        if features.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: no memory image has a labelled patch (all masks are 255)")
        return features, labels

    def memory_entries(self, maps: Tensor, masks: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This process's entries: normalised features ``(E, C)``, labels ``(E, K)`` and image index ``(E,)``."""
        grid = tuple(maps.shape[-2:])
        tokens = F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)
        num_classes = self.probe_data.num_seg_classes
        features, labels, owners = [], [], []
        for start in range(0, maps.shape[0], self.batch_size):
            stop = start + self.batch_size
            distributions = patch_label_distributions(masks[start:stop], grid, num_classes)
            for row, image in enumerate(index[start:stop].tolist()):
                keep = sample_patches(distributions[row].sum(dim=1) > 0, self.patches_per_image,
                                      self.seed * 1_000_003 + image)
                features.append(tokens[start + row, keep])
                labels.append(distributions[row, keep])
                owners.append(torch.full((keep.numel(),), image, dtype=torch.long, device=maps.device))
        if not features:
            channels = maps.shape[1]
            return maps.new_zeros(0, channels), maps.new_zeros(0, num_classes), index.new_zeros(0)
        return torch.cat(features), torch.cat(labels), torch.cat(owners)

    # ------------------------------------------------------------------------------- retrieval
    @torch.no_grad()
    def validation_miou(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: FlatIndex,
                        memory_labels: Tensor) -> float:
        """mIoU of retrieval labelling on this process's validation shard, summed over processes."""
        val_set = self.probe_data.segmentation_dataset("val", self.image_size)
        subset = fixed_subset(len(val_set), 1.0, self.max_val_images, self.seed + 1)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the segmentation validation set is empty")
        metric = {"miou": mean_iou(self.probe_data.num_seg_classes, pl_module.device)}
        batches = batch_chunks(subset, self.batch_size)[distributed.rank():: distributed.world_size()]
        for images, masks in sharded_loader(val_set, batches, self.num_workers):
            maps = dense_maps(embed_images(trainer, pl_module, images))
            masks = masks.to(pl_module.device).long()
            update_all(metric, self.label_maps(maps, index, memory_labels, masks.shape[-2:]), masks)
        return compute_all(metric)["miou"]

    def label_maps(self, maps: Tensor, index: FlatIndex, memory_labels: Tensor, size: Any) -> Tensor:
        """Predicted pixel labels ``(B, S, S)`` of feature maps ``(B, C, h, w)`` by retrieval."""
        batch, channels, height, width = maps.shape
        queries = F.normalize(maps.flatten(2).transpose(1, 2).reshape(-1, channels), dim=-1)
        similarities, neighbours = index.search(queries, self.k)
        scores = retrieval_label_scores(similarities, memory_labels.to(neighbours.device)[neighbours], self.temperature)
        scores = scores.reshape(batch, height * width, -1).transpose(1, 2).reshape(batch, -1, height, width)
        return upsample_logits(scores, tuple(size)).argmax(dim=1)
