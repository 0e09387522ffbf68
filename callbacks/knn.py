"""``KNNProbe``: weighted k-nearest-neighbour classification on global features (DINO / BAM protocol)."""
from __future__ import annotations

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor

from ssl_modules.evaluation.batches import fixed_subset
from ssl_modules.evaluation.checks import require_at_least, require_choice, require_fraction, require_positive
from ssl_modules.evaluation.features import global_vector
from ssl_modules.evaluation.knn import weighted_knn_scores
from ssl_modules.evaluation.metrics import compute_all, top_k_accuracies, update_all
from ssl_modules.evaluation.search import SearchBackend, nearest_neighbours
from ssl_modules.run.distributed import gather_in_index_order

from .paper import PaperProtocolMixin
from .probe import Probe

__all__ = ["KNNProbe"]


class KNNProbe(PaperProtocolMixin, Probe):
    """Weighted k-NN classification of the validation images against a bank of labelled training images.

    Every ``every_n_epochs`` epochs (and after the last one, and on ``trainer.validate``) the probe embeds a
    fixed, seeded fraction of ``data.eval_dataset("train")`` (the bank) and ``data.eval_dataset("val")``
    through ``pl_module.embed`` (global features, l2-normalised), finds each validation image's ``k`` most
    cosine-similar bank images, and lets them vote with weights ``exp(sim / temperature)``. Logs
    ``probe/<name>_top1`` and ``probe/<name>_top5``.

    Differs from the paper protocol (DINO's ``eval_knn.py``, ``python -m ssl_modules evaluate --protocols
    knn``): the bank is a ``train_fraction`` subset (10 %, BAM's online monitor) instead of the whole train
    set, images are at the DataModule's ``eval_size``, features under the trainer's precision, one ``k``.
    ``KNNProbe.paper_protocol()`` gives the paper protocol as a callback (``docs/evaluation.md``).

    Under DDP every process embeds a shard of both sets; the bank is gathered on every process, each process
    searches for its own validation images and the accuracies are summed over processes, so all processes log
    the single-process value.

    Args:
        k: neighbours per query.
        temperature: temperature of the vote weights.
        every_n_epochs: evaluate after every ``every_n_epochs``-th epoch (0: only after the last one).
        train_fraction: fraction of the training set in the bank, a fixed random subset (BAM's online
            setting: 0.1; DINO's offline protocol: 1.0).
        max_train_images: cap on the bank size; ``None`` for no cap.
        max_val_images: cap on the validation images (a fixed random subset); ``None`` for all.
        batch_size: images per embedding batch and process.
        backend: nearest-neighbour search: ``"faiss"`` (faiss-cpu ``IndexFlatIP``), ``"torch"`` (chunked
            matrix products, best on GPUs) or ``"auto"`` (torch on accelerators and for small banks).
        num_workers: loader workers per process (``None``: the DataModule's ``num_workers``).
        data: classification DataModule (``num_classes``, ``eval_dataset(split)``); ``None``: the trainer's.
        seed: seed of the subsets.
        name: metric prefix (``probe/<name>_top1``) and checkpoint key.
    """

    data_kind = "classification"
    paper_protocol_name = "knn"

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        train_fraction: float = 0.1,
        max_train_images: int | None = None,
        max_val_images: int | None = None,
        batch_size: int = 256,
        backend: SearchBackend = "auto",
        num_workers: int | None = None,
        data: pl.LightningDataModule | None = None,
        seed: int = 0,
        name: str = "knn",
    ) -> None:
        super().__init__(name, every_n_epochs, data, seed)
        require_at_least(1, k=k, batch_size=batch_size)
        require_positive(temperature=temperature)
        require_fraction("train_fraction", train_fraction)
        require_choice("backend", backend, ("auto", "faiss", "torch"))
        self.k, self.temperature, self.backend = k, temperature, backend
        self.train_fraction, self.max_train_images = train_fraction, max_train_images
        self.max_val_images = max_val_images
        self.batch_size, self.num_workers = batch_size, num_workers

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        data = self.probe_data
        bank, bank_labels = self.embed_bank(trainer, pl_module, data.eval_dataset("train"))
        val_set = data.eval_dataset("val")
        subset = fixed_subset(len(val_set), 1.0, self.max_val_images, self.seed + 1)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the validation set is empty")
        queries, labels, _ = self.extract(trainer, pl_module, val_set, subset, global_vector, "val features")
        similarities, neighbours = nearest_neighbours(F.normalize(queries, dim=1), bank, self.k, self.backend)
        scores = weighted_knn_scores(similarities, bank_labels.to(neighbours.device)[neighbours], data.num_classes,
                                     self.temperature)
        metrics = top_k_accuracies(data.num_classes, scores.device)
        update_all(metrics, scores, labels.long().to(scores.device))
        return compute_all(metrics)

    def floors(self) -> dict[str, float]:
        classes = self.probe_data.num_classes
        return {"top1": 1.0 / classes, "top5": min(5, classes) / classes}

    def embed_bank(self, trainer: pl.Trainer, pl_module: pl.LightningModule, train_set) -> tuple[Tensor, Tensor]:
        """The l2-normalised bank features ``(M, C)`` and labels ``(M,)`` of every process, in index order."""
        subset = fixed_subset(len(train_set), self.train_fraction, self.max_train_images, self.seed)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the training set is empty; there is no bank to search")
        features, labels, index = self.extract(trainer, pl_module, train_set, subset, global_vector, "bank features")
        _, features, labels = gather_in_index_order(index, features, labels)
        return F.normalize(features, dim=1), labels.long()
