"""``PaperProtocolProbe``: run one of ``evaluate``'s paper protocols as a callback (e.g. after the last epoch),
and ``PaperProtocolMixin``, which gives each online probe the ``paper_protocol(...)`` of the protocol it monitors."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn

from ssl_modules.evaluation.checks import require_choice

from .probe import Probe

__all__ = ["PaperProtocolProbe", "PaperProtocolMixin"]

# the kind of probe data each data root of ``evaluate`` is
_PROBE_DATA_KIND = {"imagenet": "classification", "voc": "segmentation"}


class PaperProtocolProbe(Probe):
    """The paper protocol of ``ssl_modules.evaluation`` (``docs/evaluation.md``) on the module's embedding
    backbone (the teacher where there is one), as a callback.

    The online probes are cheap monitors whose defaults differ from the papers; this callback gives the
    paper number during training instead — at the cost of the full protocol (by default only after the last
    epoch). Each online probe's ``paper_protocol(...)`` builds the matching one. Metrics are logged as
    ``probe/<name>_<metric>``; floors are in ``last_floors``.

    Args:
        protocol: ``"knn"``, ``"linear"``, ``"voc-linear"`` or ``"hummingbird"``.
        preset: the protocol's preset (``None``: its default; see ``python -m ssl_modules evaluate --help``).
        root: the data root (ImageNet layout or Pascal VOC); ``None``: the ``root`` of the probe's data or of
            the trainer's datamodule.
        overrides: settings changed on top of the preset (e.g. ``{"epochs": 10}``).
        precision: feature precision, ``"32"`` (the protocols' float32) by default.
        batch_size: images per extraction batch and process.
        num_workers: loader workers per process (``None``: the DataModule's).
        every_n_epochs: evaluate after every ``every_n_epochs``-th epoch (0: only after the last one).
        data: a DataModule whose ``root`` is the data (``None``: the trainer's).
        name: metric prefix and checkpoint key (default: the protocol).
    """

    def __init__(self, protocol: str = "knn", preset: str | None = None, root: str | None = None,
                 overrides: dict[str, Any] | None = None, precision: str = "32", batch_size: int = 64,
                 num_workers: int | None = None, every_n_epochs: int = 0, data: pl.LightningDataModule | None = None,
                 name: str | None = None) -> None:
        from ssl_modules.evaluation.api import DATA_KIND, PROTOCOLS

        require_choice("protocol", protocol, PROTOCOLS)
        super().__init__(name or protocol.replace("-", "_"), every_n_epochs, data, 0)
        self.data_kind = _PROBE_DATA_KIND[DATA_KIND[protocol]]
        self.protocol, self.preset, self.root = protocol, preset, root
        self.overrides, self.precision = dict(overrides or {}), precision
        self.batch_size, self.num_workers = batch_size, num_workers
        self._floors: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        data = self.data if self.data is not None else trainer.datamodule
        if self.root is None and getattr(data, "root", None) is None:
            raise ValueError(f"PaperProtocolProbe({self.protocol}) needs the data root: pass root=... or a "
                             "DataModule with a `root` (ImageNetDataModule, VOCSegmentationDataModule)")
        self._resolved = data
        self.inherit_num_workers(data)
        from ssl_modules.evaluation.api import check_data, resolve_settings

        root = str(self.data_root)
        check_data([self.protocol], root, root)
        resolve_settings(self.protocol, self.preset, getattr(pl_module, "embedding_backbone", None), self.overrides)

    @property
    def data_root(self) -> Path:
        return Path(self.root if self.root is not None else self._resolved.root)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        from ssl_modules.evaluation.api import evaluate

        root = str(self.data_root)
        report = evaluate(pl_module.embedding_backbone, [self.protocol], imagenet=root, voc=root,
                          presets={self.protocol: self.preset} if self.preset else None,
                          overrides={self.protocol: self.overrides}, precision=self.precision,
                          device=pl_module.device, batch_size=self.batch_size, num_workers=self.num_workers or 0,
                          show_progress=trainer.progress_bar_callback is not None)
        result = report.results[0]
        metrics = {k: v for k, v in result.metrics.items() if k != "memory_entries"}
        self._floors = {metric: result.floors[floor] for metric in metrics
                        if (floor := self._floor_of(metric)) in result.floors}
        return metrics

    def _floor_of(self, metric: str) -> str:
        """Which of the protocol's floors is the trivial value of ``metric``."""
        if "top1" in metric:
            return "chance_top1"
        if "top5" in metric:
            return "chance_top5"
        if self.protocol == "hummingbird" and metric == "miou":
            return "one_class_miou"  # after Hungarian matching a one-class answer gets its best class
        if self.protocol == "voc-linear" and metric == "miou":
            return "all_background_miou_present"
        return "all_background_miou"

    def floors(self) -> dict[str, float]:
        return self._floors


class PaperProtocolMixin:
    """For an online probe: ``paper_protocol(...)`` builds the ``PaperProtocolProbe`` of the ``evaluate``
    protocol the probe monitors cheaply (``paper_protocol_name``)."""

    paper_protocol_name: str

    @classmethod
    def paper_protocol(cls, preset: str | None = None, **kwargs: Any) -> PaperProtocolProbe:
        """The paper-protocol version of this probe: a ``PaperProtocolProbe`` running ``evaluate``'s
        protocol (``docs/evaluation.md``) with ``preset``; ``kwargs`` go to ``PaperProtocolProbe``."""
        return PaperProtocolProbe(cls.paper_protocol_name, preset, **kwargs)
