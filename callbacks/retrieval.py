"""``DenseRetrievalProbe``: in-context scene understanding by patch retrieval (Hummingbird; CrIBo's headline)."""
from __future__ import annotations


import lightning.pytorch as pl
import torch
from torch import Tensor

from ssl_modules.evaluation.batches import fixed_subset
from ssl_modules.evaluation.checks import require_at_least, require_choice, require_fraction, require_positive
from ssl_modules.evaluation.features import dense_map
from ssl_modules.evaluation.retrieval import label_maps, memory_entries, patch_labels, sample_patches
from ssl_modules.evaluation.search import FlatIndex, SearchBackend
from ssl_modules.run.distributed import gather_in_index_order

from .paper import PaperProtocolMixin
from .probe import DenseProbe

__all__ = ["DenseRetrievalProbe"]


class DenseRetrievalProbe(PaperProtocolMixin, DenseProbe):
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

    Differs from open-hummingbird-eval (``evaluate --protocols hummingbird``): no memory augmentation, at most
    ``max_train_images`` memory images with uniform patch sampling (open-HB favours rare classes), 255
    pixels left out of the labels unless ``background_for_ignore=True`` (open-HB maps them to background),
    centre crops at ``eval_size`` instead of a 512 px squash, and mIoU over present classes without
    Hungarian matching. ``DenseRetrievalProbe.paper_protocol()`` gives the paper protocol as a callback.

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
        num_workers: loader workers per process (``None``: the DataModule's ``num_workers``).
        background_for_ignore: memory labels count 255 pixels as background (open-hummingbird-eval's rule)
            instead of leaving them out.
        data: segmentation DataModule (``num_seg_classes``, ``segmentation_dataset(split, size)``); ``None``:
            the trainer's.
        seed: seed of the subsets and of the patch sampling.
        name: metric prefix (``probe/<name>_miou``) and checkpoint key.
    """

    paper_protocol_name = "hummingbird"

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
        num_workers: int | None = None,
        data: pl.LightningDataModule | None = None,
        seed: int = 0,
        name: str = "retrieval",
        background_for_ignore: bool = False,
    ) -> None:
        super().__init__(name, every_n_epochs, data, seed)
        require_at_least(1, k=k, batch_size=batch_size, patches_per_image=patches_per_image)
        require_positive(temperature=temperature)
        require_fraction("train_fraction", train_fraction)
        require_choice("backend", backend, ("auto", "faiss", "torch"))
        self.background_for_ignore = background_for_ignore
        self._floor: float | None = None
        self.k, self.temperature, self.backend = k, temperature, backend
        self.train_fraction, self.max_train_images = train_fraction, max_train_images
        self.patches_per_image, self.max_val_images, self.image_size = patches_per_image, max_val_images, image_size
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        features, labels = self.build_memory(trainer, pl_module)
        return {"miou": self.validation_miou(trainer, pl_module, FlatIndex(features, self.backend), labels)}

    def floors(self) -> dict[str, float]:
        return {"miou": self._floor} if self._floor is not None else {}

    # --------------------------------------------------------------------------------- memory
    def build_memory(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        """Memory features ``(M, C)`` (l2-normalised) and patch labels ``(M, K)`` of every process, in image
        order."""
        train_set = self.probe_data.segmentation_dataset("train", self.image_size)
        subset = fixed_subset(len(train_set), self.train_fraction, self.max_train_images, self.seed)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the segmentation training set is empty; no memory to build")
        maps, masks, index = self.extract(trainer, pl_module, train_set, subset, dense_map, "memory features")
        features, labels, owner = self.memory_entries(maps, masks, index)
        _, features, labels = gather_in_index_order(owner, features, labels)
        if features.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}: no memory image has a labelled patch (all masks are 255)")
        return features, labels

    def memory_entries(self, maps: Tensor, masks: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This process's entries: normalised features ``(E, C)``, labels ``(E, K)`` and image index ``(E,)``;
        patch labels are computed ``batch_size`` images at a time (their one-hot masks are large)."""
        num_classes = self.probe_data.num_seg_classes

        def choose(labels: Tensor, image: int) -> Tensor:
            return sample_patches(labels.sum(dim=1) > 0, self.patches_per_image, self.seed * 1_000_003 + image)

        parts = [memory_entries(maps[start:start + self.batch_size],
                                patch_labels(masks[start:start + self.batch_size], tuple(maps.shape[-2:]), num_classes,
                                             self.background_for_ignore),
                                index[start:start + self.batch_size].tolist(), choose)
                 for start in range(0, maps.shape[0], self.batch_size)]
        if not parts:
            return maps.new_zeros(0, maps.shape[1]), maps.new_zeros(0, num_classes), index.new_zeros(0)
        features, labels, owners = (torch.cat(values) for values in zip(*parts))
        return features, labels, owners

    # ------------------------------------------------------------------------------- retrieval
    @torch.no_grad()
    def validation_miou(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: FlatIndex,
                        memory_labels: Tensor) -> float:
        """mIoU of retrieval labelling of the validation subset (every process the same value)."""
        def predict(maps: Tensor, size: tuple[int, int]) -> Tensor:
            return label_maps(maps, index, memory_labels, self.k, self.temperature, size)

        result = self.dense_evaluation(trainer, pl_module, predict)
        self._floor = result["miou_floor"]
        return result["miou"]
