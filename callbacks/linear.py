"""``OnlineLinearProbe``: a linear classifier on detached global features, trained while the method trains."""
from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_modules.evaluation.batches import LabelledStream, fixed_subset
from ssl_modules.evaluation.checks import require_at_least, require_choice, require_positive
from ssl_modules.evaluation.features import global_vector
from ssl_modules.evaluation.metrics import compute_all, top_k_accuracies, update_all
from ssl_modules.evaluation.training import broadcast_module_, head_optimizer, seeded_head
from ssl_modules.run import distributed
from ssl_modules.run.distributed import gather_in_index_order

from .paper import PaperProtocolMixin
from .probe import PROBE_OPTIMIZERS, Probe, embed_images, probe_progress, trainable_context

__all__ = ["OnlineLinearProbe", "LinearClassifier", "labelled_images", "step_embedding"]


class LinearClassifier(nn.Module):
    """``Linear(C, classes)`` (weights N(0, 0.01), bias 0), after a parameter-free BatchNorm when ``normalize``.

    The BatchNorm (no affine part, as in MAE's linear probing) puts features of any scale on one footing, so
    one learning rate suits every backbone; in eval mode it is a fixed affine map, so the probe stays linear.
    """

    def __init__(self, in_features: int, num_classes: int, normalize: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if normalize else nn.Identity()
        self.linear = nn.Linear(in_features, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.norm(features))


def labelled_images(batch: Any) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """``(images, labels, dataset indices or None)`` of a training batch: a ``Views`` batch (its first crop,
    its ``label`` and ``index``) or an ``(images, labels)`` pair; ``None`` for any other batch."""
    if hasattr(batch, "crops") and hasattr(batch, "label"):
        return batch.crops[0], batch.label, getattr(batch, "index", None)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor) and batch[0].dim() == 4:
        labels = batch[1]
        if isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point():
            return batch[0], labels, None
    return None


def step_embedding(outputs: Any, batch_size: int) -> Tensor | None:
    """The detached ``(B, C)`` global feature of ``crops[0]`` a training step returned as
    ``outputs["embedding"]`` (the methods' fast path), or ``None`` when it returned none."""
    embedding = outputs.get("embedding") if isinstance(outputs, dict) else None
    if isinstance(embedding, Tensor) and embedding.dim() == 2 and embedding.shape[0] == batch_size:
        return embedding
    return None


class OnlineLinearProbe(PaperProtocolMixin, Probe):
    """A linear classifier on the detached global features of ``pl_module.embed``, with its own optimizer.

    Training, after every training batch (``on_train_batch_end``), one step of its own optimizer on:

    - ``train_on="batches"``: the training batch itself — ``Views.crops[0]`` with ``Views.label`` (rows with
      label -1 are skipped), or an ``(images, labels)`` batch. When the training step returns
      ``{"loss": ..., "embedding": (B, C)}`` (every method of the library does), the probe trains on that
      embedding of ``crops[0]`` and makes no backbone call of its own;
    - ``train_on="loader"``: a batch of the probe's own labelled loader over ``data.eval_dataset("train")``,
      for pretraining data without labels (COCO);
    - ``"auto"``: ``"batches"`` if the first training batch carries a label >= 0 on any process, else
      ``"loader"``.

    Differs from the paper protocols (DINO/BAM/VICRegL linear evaluation, ``evaluate --protocols linear``):
    the head trains while the backbone changes, on un-augmented ``crops[0]``, with a constant learning
    rate, instead of 100 epochs on the final frozen backbone. ``OnlineLinearProbe.paper_protocol("bam")``
    (or ``"dino"``, ``"vicregl"``) gives the paper protocol as a callback (``docs/evaluation.md``).

    Under DDP every process embeds its own images, the features and labels are all-gathered (in dataset-index
    order) and every process makes the same update on the same global batch: no DDP wrapper, identical heads.

    Evaluation (every ``every_n_epochs`` epochs, after the last one and on ``trainer.validate``): top-1/top-5
    accuracy on ``data.eval_dataset("val")``, logged as ``probe/<name>_top1`` and ``probe/<name>_top5``; the
    training loss is logged per step as ``probe/<name>_loss``. A head that was never trained (e.g.
    ``trainer.validate`` with a fresh probe) is first trained for ``validate_steps`` steps on cached features
    of its own labelled images (``train_on_frozen_features``).
    The head, its optimizer, the step count and the loader position are saved in the checkpoint.

    Args:
        train_on: ``"auto"``, ``"batches"`` or ``"loader"`` (see above).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"``.
        lr: learning rate of the probe's optimizer (constant; the method's schedule does not touch it).
        momentum: SGD momentum.
        weight_decay: weight decay of the probe's optimizer.
        batch_size: global batch of the own loader (over all processes) and per-process evaluation batch.
        normalize: a parameter-free BatchNorm before the linear layer.
        every_n_epochs: evaluate after every ``every_n_epochs``-th epoch (0: only after the last one).
        max_val_images: cap on the validation images (a fixed random subset); ``None`` for all.
        validate_steps: training steps of a head that has never been trained (on cached features of the
            labelled training images).
        num_workers: loader workers per process (``None``: the DataModule's ``num_workers``).
        data: classification DataModule (``num_classes``, ``eval_dataset(split)``); ``None``: the trainer's.
        seed: seed of the head initialisation, the loader order and the validation subset.
        name: metric prefix (``probe/<name>_top1``) and checkpoint key.
    """

    data_kind = "classification"
    paper_protocol_name = "linear"

    def __init__(
        self,
        train_on: Literal["auto", "batches", "loader"] = "auto",
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        normalize: bool = True,
        every_n_epochs: int = 1,
        max_val_images: int | None = None,
        validate_steps: int = 300,
        num_workers: int | None = None,
        data: pl.LightningDataModule | None = None,
        seed: int = 0,
        name: str = "linear",
    ) -> None:
        super().__init__(name, every_n_epochs, data, seed)
        require_choice("train_on", train_on, ("auto", "batches", "loader"))
        require_choice("optimizer", optimizer, PROBE_OPTIMIZERS)
        require_positive(lr=lr)
        require_at_least(1, batch_size=batch_size)
        require_at_least(0, validate_steps=validate_steps)
        self.train_on, self.optimizer_name = train_on, optimizer
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.batch_size, self.normalize, self.max_val_images = batch_size, normalize, max_val_images
        self.validate_steps, self.num_workers = validate_steps, num_workers
        self.head: LinearClassifier | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0
        self.source: str | None = None if train_on == "auto" else train_on
        self._stream: LabelledStream | None = None
        self._stream_position: tuple[int, int] = (0, 0)
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------- parts
    def build_head(self, in_features: int, device: torch.device) -> LinearClassifier:
        """The head (seeded) and its optimizer, restored from a checkpoint state if one is waiting."""
        classes = self.probe_data.num_classes
        head = seeded_head(lambda generator: LinearClassifier(in_features, classes, self.normalize, generator),
                           self.seed, device)
        optimizer = head_optimizer(head, self.optimizer_name, self.lr, self.weight_decay, self.momentum)
        if self._pending is not None:
            head.load_state_dict(self._pending["head"])
            optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None
        self.head, self.optimizer = head, optimizer
        return head

    def stream(self) -> LabelledStream:
        """The probe's own labelled loader (built on first use, at the saved position)."""
        if self._stream is None:
            self._stream = LabelledStream(self.probe_data.eval_dataset("train"), self.batch_size, self.seed,
                                          self.num_workers)
            self._stream.seek(self._stream_position)
        return self._stream

    # ---------------------------------------------------------------------------------- training
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.guarded("head training", lambda: self.train_on_batch(trainer, pl_module, outputs, batch))

    def train_on_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        """One head update from this training batch (or the probe's own loader)."""
        with trainable_context():
            if self.choose_source(batch, pl_module.device) == "batches":
                found = labelled_images(batch)
                if found is None:
                    raise TypeError(f"{type(self).__name__}(train_on='batches') needs labelled training batches "
                                    f"(Views or (images, labels)); got {type(batch).__name__}. "
                                    "Use train_on='loader' to train on the probe's own labelled data.")
                images, labels, index = found
                embedding = step_embedding(outputs, images.shape[0])
                if embedding is not None:
                    loss = self.train_on_step_embedding(embedding, labels, index)
                else:
                    loss = self.train_step(trainer, pl_module, images, labels, index)
            else:
                images, labels, index = self.stream().next()
                loss = self.train_step(trainer, pl_module, images, labels, index)
        if loss is not None:
            self.log_value(pl_module, "loss", loss, on_step=True)

    def train_on_step_embedding(self, embedding: Tensor, labels: Tensor, index: Tensor | None) -> Tensor:
        """One update on the features the training step already computed (no second backbone forward).

        Training batches have the same size on every process, so a fixed-size all-gather suffices and the
        rows are put in dataset-index order on the device (no host synchronisation).
        """
        device = embedding.device
        labels = labels.to(device).long()
        features = distributed.all_gather_no_grad(embedding.detach().float())
        labels = distributed.all_gather_no_grad(labels)
        if index is not None:
            order = distributed.all_gather_no_grad(index.to(device).long()).argsort(stable=True)
            features, labels = features[order], labels[order]
        return self.update_head_masked(features, labels)

    def update_head_masked(self, features: Tensor, labels: Tensor) -> Tensor:
        """One optimizer step on a global batch, rows with label -1 weighted 0 (shape-static, no host sync)."""
        head = self.head if self.head is not None else self.build_head(features.shape[1], features.device)
        head.train()
        keep = labels >= 0
        losses = F.cross_entropy(head(features), labels.clamp(min=0), reduction="none")
        loss = (losses * keep).sum() / keep.sum().clamp(min=1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.detach()

    def choose_source(self, batch: Any, device: torch.device) -> str:
        """The training source, decided once (the same on every process) for ``train_on="auto"``."""
        if self.source is None:
            found = labelled_images(batch)
            labelled = found is not None and bool((found[1] >= 0).any())
            agreed = distributed.all_reduce(torch.tensor([float(labelled)], device=device), "max")
            self.source = "batches" if agreed.item() > 0 else "loader"
        return self.source

    def train_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor, labels: Tensor,
                   index: Tensor | None) -> Tensor | None:
        """One update on the global batch (every process's images); ``None`` if it holds < 2 labelled rows."""
        device = pl_module.device
        features = global_vector(embed_images(trainer, pl_module, images))
        labels = labels.to(device).long()
        if index is None:  # no dataset index: keep the processes' (rank) order
            index = torch.zeros(labels.shape[0], dtype=torch.long, device=device)
        _, features, labels = gather_in_index_order(index.to(device), features, labels)
        return self.update_head(features, labels)

    def update_head(self, features: Tensor, labels: Tensor) -> Tensor | None:
        """One optimizer step of the head on a global batch of features (identical on every process)."""
        keep = labels >= 0
        if int(keep.sum()) < 2:
            return None
        head = self.head if self.head is not None else self.build_head(features.shape[1], features.device)
        head.train()
        loss = F.cross_entropy(head(features[keep]), labels[keep])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.detach()

    def train_on_frozen_features(self, trainer: pl.Trainer, pl_module: pl.LightningModule, steps: int) -> None:
        """``steps`` updates of a head that was never trained (``trainer.validate``), on cached features.

        The evaluation images are not augmented, so an image's features do not change from one pass to the
        next: a fixed, seeded subset of at most ``steps * batch_size`` training images is embedded once
        (never more backbone calls than streaming would cost) and the head cycles through it in seeded
        random batches. Every process holds the gathered cache and makes the same updates.
        """
        train_set = self.probe_data.eval_dataset("train")
        subset = fixed_subset(len(train_set), 1.0, steps * self.batch_size, self.seed)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the training set is empty; there is nothing to train the head on")
        features, labels, index = self.extract(trainer, pl_module, train_set, subset, global_vector, "train features")
        _, features, labels = gather_in_index_order(index, features, labels)
        labels = labels.long()
        generator = torch.Generator().manual_seed(self.seed)
        batches: list[Tensor] = []
        for _ in probe_progress(trainer, range(steps), steps, f"{self.name}: head training"):
            if not batches:
                order = torch.randperm(features.shape[0], generator=generator)
                batches = list(order.split(self.batch_size))
            rows = batches.pop(0).sort().values.to(features.device)
            self.update_head(features[rows], labels[rows])

    # -------------------------------------------------------------------------------- evaluation
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        data = self.probe_data
        if self.steps == 0 and self.validate_steps > 0:
            self.train_on_frozen_features(trainer, pl_module, self.validate_steps)
        val_set = data.eval_dataset("val")
        subset = fixed_subset(len(val_set), 1.0, self.max_val_images, self.seed + 1)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the validation set is empty")
        features, labels, _ = self.extract(trainer, pl_module, val_set, subset, global_vector, "val features")
        head = self.head if self.head is not None else self.build_head(features.shape[1], pl_module.device)
        broadcast_module_(head)
        head.eval()
        with torch.no_grad():
            logits = head(features)
        metrics = top_k_accuracies(data.num_classes, logits.device)
        update_all(metrics, logits, labels.long())
        return compute_all(metrics)

    def floors(self) -> dict[str, float]:
        classes = self.probe_data.num_classes
        return {"top1": 1.0 / classes, "top5": min(5, classes) / classes}

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        position = self._stream.position if self._stream is not None else self._stream_position
        state: dict[str, Any] = {"steps": self.steps, "source": self.source, "stream_position": tuple(position)}
        if self.head is not None:
            state.update(head=self.head.state_dict(), optimizer=self.optimizer.state_dict())
        elif self._pending is not None:
            state.update(self._pending)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.source = state_dict["source"] if self.train_on == "auto" else self.train_on
        self._stream_position = tuple(state_dict["stream_position"])
        if self._stream is not None:
            self._stream.seek(self._stream_position)
        self._pending = {k: state_dict[k] for k in ("head", "optimizer")} if "head" in state_dict else None
        if self._pending is not None and self.head is not None:
            self.head.load_state_dict(self._pending["head"])
            self.optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._stream is not None:
            self._stream_position = self._stream.position
            self._stream.close()
