"""``VOCSegmentationProbe``: a linear segmentation head on frozen dense features, mIoU on VOC val."""
from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.evaluation.batches import fixed_subset
from ssl_modules.evaluation.checks import require_at_least, require_choice, require_positive
from ssl_modules.evaluation.features import dense_map
from ssl_modules.evaluation.metrics import IGNORE_INDEX
from ssl_modules.evaluation.retrieval import upsample_logits
from ssl_modules.evaluation.training import broadcast_module_, head_optimizer, seeded_head
from ssl_modules.run.distributed import gather_in_index_order

from .diagnostics import log_segmentation_examples
from .paper import PaperProtocolMixin
from .probe import PROBE_OPTIMIZERS, DenseProbe, probe_progress

__all__ = ["VOCSegmentationProbe", "LinearSegmentationHead"]


class LinearSegmentationHead(nn.Module):
    """BatchNorm + 1x1 convolution over feature maps ``(B, C, h, w)`` -> logits ``(B, classes, h, w)``.

    VICRegL's and CrIBo's linear segmentation head (their BN is a SyncBatchNorm; here every process trains
    the same head on the same gathered features, so a plain BatchNorm sees the global batch). At test time the
    BatchNorm is a fixed affine map, so the head is linear.
    """

    def __init__(self, in_channels: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.classifier(self.norm(features))


class VOCSegmentationProbe(PaperProtocolMixin, DenseProbe):
    """Linear segmentation of frozen dense features (Pascal VOC protocol in miniature), mIoU on val.

    Every ``every_n_epochs`` epochs (and after the last one, and on ``trainer.validate``):

    1. embed a fixed, seeded subset of ``data.segmentation_dataset("train", image_size)`` through
       ``pl_module.embed`` and cache its dense features ``(N, C, h, w)`` and masks (once per evaluation, so
       the head's steps cost no backbone call);
    2. train a fresh, seeded ``LinearSegmentationHead`` for ``steps`` steps on random batches of the cache:
       logits upsampled bilinearly to the mask size, cross-entropy ignoring 255;
    3. predict ``data.segmentation_dataset("val", image_size)`` (logits upsampled to the mask size, argmax)
       and log the mean IoU as ``probe/<name>_miou`` (torchmetrics, 255 ignored).

    The head starts from the same initialisation and sees the same batches at every evaluation, so the
    numbers of successive evaluations differ only through the features. With a TensorBoard logger, rank 0
    also logs ``num_logged_images`` validation images with their ground truth and prediction.

    Differs from the paper protocols (CrIBo's / VICRegL's linear segmentation, ``evaluate --protocols
    voc-linear``): a few hundred steps on cached, un-augmented centre crops at ``eval_size`` of at most
    ``max_train_images`` images, instead of 40k-80k iterations on augmented 512 px crops with sliding-window
    inference. ``VOCSegmentationProbe.paper_protocol("cribo")`` gives the paper protocol as a callback.

    Under DDP each process embeds a shard of the training subset; the cache is gathered (in index order) on
    every process, every process trains the same head on the same batches, and the validation images are
    split between processes with the IoU counts summed, so every process logs the single-process value.

    Args:
        every_n_epochs: evaluate after every ``every_n_epochs``-th epoch (0: only after the last one).
        steps: training steps of the head per evaluation.
        batch_size: cached images per head step, and images per embedding batch and process.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        lr: learning rate of the head (constant).
        weight_decay: weight decay of the head.
        image_size: side of the probe's images (``None``: the DataModule's ``eval_size``).
        max_train_images: training images in the cache (a fixed random subset); ``None`` for all.
        max_val_images: validation images (a fixed random subset); ``None`` for all.
        num_logged_images: validation examples logged to TensorBoard (0 for none).
        num_workers: loader workers per process (``None``: the DataModule's ``num_workers``).
        data: segmentation DataModule (``num_seg_classes``, ``segmentation_dataset(split, size)``), e.g.
            ``VOCSegmentationDataModule(root)``; ``None``: the trainer's.
        seed: seed of the subsets, the head initialisation and its batches.
        name: metric prefix (``probe/<name>_miou``) and checkpoint key.
    """

    paper_protocol_name = "voc-linear"

    def __init__(
        self,
        every_n_epochs: int = 1,
        steps: int = 300,
        batch_size: int = 16,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        image_size: int | None = None,
        max_train_images: int | None = 1000,
        max_val_images: int | None = 500,
        num_logged_images: int = 4,
        num_workers: int | None = None,
        data: pl.LightningDataModule | None = None,
        seed: int = 0,
        name: str = "voc",
    ) -> None:
        super().__init__(name, every_n_epochs, data, seed)
        require_choice("optimizer", optimizer, PROBE_OPTIMIZERS)
        require_at_least(1, steps=steps, batch_size=batch_size)
        require_positive(lr=lr)
        self.steps, self.batch_size, self.optimizer_name = steps, batch_size, optimizer
        self.lr, self.weight_decay, self.image_size = lr, weight_decay, image_size
        self.max_train_images, self.max_val_images = max_train_images, max_val_images
        self.num_logged_images, self.num_workers = num_logged_images, num_workers
        self.head: LinearSegmentationHead | None = None
        self._floor: float | None = None

    # ------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        features, masks = self.cached_training_features(trainer, pl_module)
        head = self.train_head(features, masks, trainer)
        return self.validation_miou(trainer, pl_module, head)

    def floors(self) -> dict[str, float]:
        return {"miou": self._floor} if self._floor is not None else {}

    def cached_training_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor]:
        """Dense feature maps ``(N, C, h, w)`` and uint8 masks ``(N, S, S)`` of the training subset, every
        process's shard gathered in index order."""
        train_set = self.probe_data.segmentation_dataset("train", self.image_size)
        subset = fixed_subset(len(train_set), 1.0, self.max_train_images, self.seed)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the segmentation training set is empty")
        features, masks, index = self.extract(trainer, pl_module, train_set, subset, dense_map, "train features")
        _, features, masks = gather_in_index_order(index, features, masks.to(torch.uint8))
        return features, masks

    def new_head(self, channels: int, device: torch.device) -> tuple[LinearSegmentationHead, torch.optim.Optimizer]:
        """A freshly initialised (seeded) head and its optimizer."""
        classes = self.probe_data.num_seg_classes
        head = seeded_head(lambda generator: LinearSegmentationHead(channels, classes, generator), self.seed, device)
        return head, head_optimizer(head, self.optimizer_name, self.lr, self.weight_decay)

    def train_head(self, features: Tensor, masks: Tensor, trainer: pl.Trainer | None = None) -> LinearSegmentationHead:
        """``steps`` steps on random batches of the cache (the same batches on every process)."""
        head, optimizer = self.new_head(features.shape[1], features.device)
        generator = torch.Generator().manual_seed(self.seed)
        batch = min(self.batch_size, features.shape[0])
        head.train()
        for _ in probe_progress(trainer, range(self.steps), self.steps, f"{self.name}: head training"):
            rows = torch.randperm(features.shape[0], generator=generator)[:batch].to(features.device)
            targets = masks[rows].long()
            logits = upsample_logits(head(features[rows]), targets.shape[-2:])
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        broadcast_module_(head)
        self.head = head.eval()
        return self.head

    @torch.no_grad()
    def validation_miou(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        head: LinearSegmentationHead) -> dict[str, float]:
        """``{"miou": ...}`` of the head on the validation subset (every process the same value)."""
        def predict(maps: Tensor, size: tuple[int, int]) -> Tensor:
            return upsample_logits(head(maps), size).argmax(dim=1)

        def log_examples(images: Tensor, masks: Tensor, predictions: Tensor) -> None:
            if self.num_logged_images and trainer.global_rank == 0:
                log_segmentation_examples(trainer, f"probe/{self.name}_examples", images, masks, predictions,
                                          num_classes=self.probe_data.num_seg_classes, count=self.num_logged_images)

        result = self.dense_evaluation(trainer, pl_module, predict, log_examples)
        self._floor = result["miou_floor"]
        return {"miou": result["miou"]}

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The head of the last evaluation (the next evaluation trains a fresh one)."""
        return {"head": self.head.state_dict()} if self.head is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        head_state = state_dict.get("head")
        if head_state is None:
            return
        channels = head_state["norm.weight"].shape[0]
        classes = head_state["classifier.weight"].shape[0]
        self.head = seeded_head(lambda generator: LinearSegmentationHead(channels, classes, generator), self.seed,
                                torch.device("cpu")).eval()
        self.head.load_state_dict(head_state)
