"""``Probe``: what every online probe shares — when it runs, where its data comes from, how it logs, and how
it reads the backbone (``pl_module.embed`` under the trainer's precision) into the evaluation core
(``ssl_modules.evaluation``: extraction, search, votes, retrieval, metrics, head training)."""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torch.utils.data import Dataset

from ssl_modules.contracts import Features
from ssl_modules.evaluation.batches import batch_chunks, fixed_subset, shard_batches, sharded_loader
from ssl_modules.evaluation.features import FeatureSelector, dense_map, extract_shard, progress
from ssl_modules.evaluation.metrics import compute_all, mean_iou, update_all
from ssl_modules.run import distributed
from ssl_modules.run.optional_parts import PartFailedError, agreed_failure, isolated_rng, stopped_early
from ssl_modules.run.sharding import gathered

from .data import check_probe_datasets, prepare_probe_data, resolve_probe_data

__all__ = ["Probe", "DenseProbe", "PROBE_OPTIMIZERS", "DensePredictor", "embed_images", "probe_progress",
           "trainable_context"]

#: the head optimizers a probe offers (of ``ssl_modules.evaluation.training.HEAD_OPTIMIZERS``)
PROBE_OPTIMIZERS = ("sgd", "adamw")
#: feature maps (B, C, h, w), mask size (H, W) -> predicted labels (B, H, W)
DensePredictor = Callable[[Tensor, tuple[int, int]], Tensor]

log = logging.getLogger("callbacks.probes")

# Probe values are equal on every process and logged without sync_dist on purpose (``Probe.log_value``).
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('probe/", category=PossibleUserWarning)


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


@contextlib.contextmanager
def trainable_context() -> Iterator[None]:
    """Gradients on and inference mode off, whatever the caller's loop set (``trainer.validate`` runs its
    hooks under ``torch.inference_mode``; a probe that trains a head needs autograd there)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def probe_progress(trainer: pl.Trainer | None, iterable: Iterable[Any], total: int, desc: str) -> Iterable[Any]:
    """``iterable`` in a transient bar below the trainer's (rank 0, only when the trainer shows its bar)."""
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    shown = bar is not None and not getattr(bar, "is_disabled", False)
    return progress(iterable, total, desc, shown, 2 * getattr(bar, "process_position", 0) + 1)


class Probe(Callback):
    """Base of the probes: evaluates every ``every_n_epochs`` epochs of ``fit`` (and after the last one),
    and once per ``trainer.validate``; logs ``probe/<name>_<metric>`` identically on every process.

    Subclasses set ``data_kind`` and implement ``evaluate``; they read features only through
    ``pl_module.embed``.

    During ``fit`` the probe evaluates in ``on_train_epoch_end``. To select checkpoints on a probe metric
    (``ModelCheckpoint(monitor="probe/knn_top1")``) while a validation loop also runs, give the checkpoint
    callback ``save_on_train_epoch_end=True``: otherwise it looks for the metric after validation, before the
    probe has logged it.

    Failures: the probe's data is checked when ``fit`` or ``validate`` starts (layout, one sample read, mask
    sizes), so a broken data set stops the run before the first training step. An exception while the probe
    runs later never stops training: under DDP the processes agree on it (a failure on any rank, an OOM on
    one GPU say, is seen by all, and none is left waiting in a collective of the probe), it is reported once
    (naming the rank and the exception), the probe disables itself on every process and the message is
    appended to ``failures`` (the CLI lists them at the end and exits 1, after the checkpoint and the export
    are written). The probe runs on the global random generators without changing them, so training draws
    the same numbers with or without it; after a signal or ``max_time`` stop it does not evaluate.

    Results: ``last_metrics`` (metric -> value of the last evaluation) and ``last_floors`` (metric -> its
    trivial floor: chance top-1, all-background mIoU, ...).

    Args:
        name: prefix of the logged metrics (``probe/<name>_top1``) and of the checkpoint state key; give two
            probes of one class different names.
        every_n_epochs: evaluate after every ``every_n_epochs``-th training epoch; 0 evaluates only after the
            last one.
        data: a DataModule implementing the probe-data protocol; ``None`` uses the trainer's datamodule.
        seed: seed of every random choice of the probe (subsets, head initialisation, batch order).
    """

    data_kind: Literal["classification", "segmentation"] = "classification"
    batch_size: int  # images per embedding batch and process (set by every subclass)
    num_workers: int | None

    def __init__(self, name: str, every_n_epochs: int = 1, data: pl.LightningDataModule | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 0 (0: only after the last epoch)")
        if not name:
            raise ValueError("name must be a non-empty string (it prefixes the logged metrics)")
        self.name, self.every_n_epochs, self.data, self.seed = name, every_n_epochs, data, seed
        self.last_metrics: dict[str, float] = {}
        self.last_floors: dict[str, float] = {}
        self.failures: list[str] = []
        self._resolved: Any = None

    # -------------------------------------------------------------------------------- identity
    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[{self.name}]"

    def metric_name(self, metric: str) -> str:
        return f"probe/{self.name}_{metric}"

    # ------------------------------------------------------------------------------------- data
    @property
    def probe_data(self) -> Any:
        """The DataModule the probe reads (resolved in ``setup``)."""
        if self._resolved is None:
            raise RuntimeError(f"{type(self).__name__} has no data yet: it is resolved when the Trainer sets it up")
        return self._resolved

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the module and the data before any work is done (for ``fit`` and ``validate``; the probe
        does nothing in ``test`` or ``predict``)."""
        if stage not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        require_embed(type(self).__name__, pl_module)
        self._resolved = resolve_probe_data(type(self).__name__, self.data, trainer, self.data_kind)
        prepare_probe_data(self.data, trainer, stage)
        check_probe_datasets(type(self).__name__, self._resolved, self.data_kind, self.probe_image_size)
        self.inherit_num_workers(self._resolved)

    @property
    def probe_image_size(self) -> int | None:
        """The side of the probe's segmentation images (``None``: the DataModule's ``eval_size``)."""
        return getattr(self, "image_size", None)

    def inherit_num_workers(self, data: Any) -> None:
        """A probe built with ``num_workers=None`` uses its data's ``num_workers`` (re-read at every setup)."""
        if not hasattr(self, "num_workers"):
            return
        if not hasattr(self, "_configured_num_workers"):
            self._configured_num_workers = self.num_workers
        if self._configured_num_workers is None:
            self.num_workers = int(getattr(data, "num_workers", 0) or 0)

    # --------------------------------------------------------------------------------- failures
    @property
    def disabled(self) -> bool:
        return bool(self.failures)

    def guarded(self, what: str, function: Callable[[], Any]) -> Any:
        """``function()`` as an optional part: on the global RNGs without changing them, and with a failure
        on any process agreed by all (``ssl_modules.run.optional_parts``): every process then disables the probe
        together, the failure is reported once (naming the rank and the exception) and kept in ``failures``."""
        if self.disabled:
            return None
        try:
            with isolated_rng(), agreed_failure(f"{type(self).__name__}[{self.name}]"):
                return function()
        except PartFailedError as failure:
            where = "; ".join(f"on rank {rank}: {error}" for rank, error in sorted(failure.failures.items()))
            message = f"{type(self).__name__}[{self.name}] failed during {what} {where}"
            self.failures.append(message)
            self._report(message, failure)
            return None

    def _report(self, message: str, failure: PartFailedError) -> None:
        """Rank 0 says what failed where; a failing process also logs its own traceback."""
        rank = distributed.rank()
        if rank in failure.failures and failure.__cause__ is not None:
            log.error("rank %d: %s", rank, message, exc_info=failure.__cause__)
        elif rank == 0:
            log.error("%s (the probe is disabled on every process; training continues)", message)

    # ------------------------------------------------------------------------------------- when
    def is_due(self, trainer: pl.Trainer) -> bool:
        """Whether the epoch that just ended is one to evaluate after (never after a signal or ``max_time``
        stop: the grace period before the job is killed is for the stop checkpoint)."""
        if stopped_early(trainer):
            return False
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            return True
        return self.is_last_epoch(trainer)

    @staticmethod
    def is_last_epoch(trainer: pl.Trainer) -> bool:
        """Whether training stops after the epoch that just ended (max_epochs, max_steps or a stop request such
        as ``EarlyStopping``'s)."""
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
            return True
        if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
            return True
        return bool(trainer.should_stop)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_due(trainer):
            self.guarded("evaluation", lambda: self.run(trainer, pl_module))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # During fit the probe runs at the end of the training epoch; here only for trainer.validate(...).
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.guarded("evaluation", lambda: self.run(trainer, pl_module))

    # ---------------------------------------------------------------------------------- running
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Evaluate (every process together) and log the metrics; returns them. Under FSDP2 the embedding
        backbone is gathered for the evaluation (its forwards then issue no collective, and the processes'
        shards of batches may differ by one: ``docs/fsdp2.md``)."""
        backbone = getattr(pl_module, "embedding_backbone", None)
        with trainable_context(), gathered(backbone if isinstance(backbone, nn.Module) else pl_module):
            metrics = self.evaluate(trainer, pl_module)
        self.last_metrics = dict(metrics)
        self.last_floors = {k: v for k, v in self.floors().items() if k in metrics}
        for metric, value in metrics.items():
            self.log_value(pl_module, metric, value)
        return metrics

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """The probe's metrics, equal on every process (``metric -> value``, logged as ``probe/<name>_<metric>``)."""
        raise NotImplementedError

    def floors(self) -> dict[str, float]:
        """The trivial floor of each metric (metric -> value); probes override where one exists."""
        return {}

    def log_value(self, pl_module: pl.LightningModule, metric: str, value: float | Tensor,
                  on_step: bool = False) -> None:
        """Log a value that is already equal on every process.

        Never with ``sync_dist``: an epoch value synced by Lightning is reduced wherever it is first read,
        and the progress bar reads it on rank 0 only, which would put that collective out of order with the
        other processes' (the run would hang at the epoch end). The value is equal everywhere already.
        """
        pl_module.log(self.metric_name(metric), value, on_step=on_step, on_epoch=not on_step, sync_dist=False,
                      reduce_fx="max")

    # ---------------------------------------------------------------------------------- features
    def extract(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Dataset, subset: Sequence[int],
                select: FeatureSelector, desc: str) -> tuple[Tensor, Tensor, Tensor]:
        """Features, targets and dataset indices of this process's shard of ``subset`` (batches of the probe's
        ``batch_size``), read through ``pl_module.embed`` (``ssl_modules.evaluation.features.extract_shard``)."""
        return extract_shard(lambda images: embed_images(trainer, pl_module, images), dataset,
                             batch_chunks(subset, self.batch_size), select, pl_module.device, self.num_workers,
                             bar=lambda loader, total: probe_progress(trainer, loader, total, f"{self.name}: {desc}"))


class DenseProbe(Probe):
    """Base of the segmentation-style probes (VOC linear head, retrieval): their dense evaluation loop.

    Subclasses set ``image_size`` and ``max_val_images``."""

    data_kind = "segmentation"
    image_size: int | None
    max_val_images: int | None

    @torch.no_grad()
    def dense_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predict: DensePredictor,
                         first_batch: Callable[[Tensor, Tensor, Tensor], None] | None = None) -> dict[str, float]:
        """``{"miou": ..., "miou_floor": ...}`` of ``predict`` on the probe's segmentation validation subset.

        Each process labels its shard of whole batches; the IoU counts are summed, so every process gets the
        one-process value. ``miou_floor`` is the same metric for a prediction of background (0) everywhere.
        ``first_batch(images, masks, predictions)`` sees this process's first batch (e.g. to log examples).
        """
        data = self.probe_data
        val_set = data.segmentation_dataset("val", self.image_size)
        subset = fixed_subset(len(val_set), 1.0, self.max_val_images, self.seed + 1)
        if not subset:
            raise ValueError(f"{type(self).__name__}: the segmentation validation set is empty")
        metrics = {"miou": mean_iou(data.num_seg_classes, pl_module.device),
                   "miou_floor": mean_iou(data.num_seg_classes, pl_module.device)}
        batches = shard_batches(batch_chunks(subset, self.batch_size))
        loader = sharded_loader(val_set, batches, self.num_workers)
        for position, (images, masks) in enumerate(probe_progress(trainer, loader, len(batches),
                                                                  f"{self.name}: evaluation")):
            maps = dense_map(embed_images(trainer, pl_module, images))
            masks = masks.to(pl_module.device).long()
            predictions = predict(maps, tuple(masks.shape[-2:]))
            update_all({"miou": metrics["miou"]}, predictions, masks)
            update_all({"miou_floor": metrics["miou_floor"]}, torch.zeros_like(masks), masks)
            if position == 0 and first_batch is not None:
                first_batch(images, masks, predictions)
        return compute_all(metrics)
