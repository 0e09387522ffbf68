"""``evaluate(model, protocols, ...)``: the papers' protocols on any backbone, one feature extraction shared."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_modules.evaluation.sources import describe_source, load_backbone
from ssl_modules.evaluation.cards import SEEDED, mean_and_std, protocol_card
from ssl_modules.evaluation.checks import check_dataset
from ssl_modules.evaluation.datasets import imagenet_split
from ssl_modules.evaluation.layouts import SEGMENTATION_DATASETS, segmentation_classes, segmentation_split
from ssl_modules.evaluation.sizes import SizeRule, scaled_settings, size_rule
from ssl_modules.evaluation.features import Extractor, FeatureCache
from ssl_modules.evaluation.hummingbird import HummingbirdSettings, run_hummingbird
from ssl_modules.evaluation.knn import KNNSettings, run_knn
from ssl_modules.evaluation.linear import LINEAR_PRESETS, linear_preset, run_linear
from ssl_modules.evaluation.voc_linear import VOC_LINEAR_PRESETS, run_voc_linear
from ssl_modules.run import distributed

__all__ = ["PROTOCOLS", "PRESETS", "DATA_KIND", "ProtocolResult", "EvaluationReport", "evaluate", "resolve_settings",
           "check_settings", "check_roots_given", "check_data"]

PROTOCOLS = ("knn", "linear", "voc-linear", "hummingbird")
# protocol -> preset -> (paper table it reproduces). The first preset is the default.
PRESETS: dict[str, dict[str, str]] = {
    "knn": {"dino": "DINO (Caron et al. 2021) ImageNet table, k-NN column; eval_knn.py: full train bank, "
                    "k 10/20/100/200, "
                    "T 0.07 (BAM's and CrIBo's ImageNet k-NN results use the same protocol, k 20)"},
    "linear": {name: settings.paper for name, settings in LINEAR_PRESETS.items()},
    "voc-linear": {name: settings.paper for name, settings in VOC_LINEAR_PRESETS.items()},
    "hummingbird": {
        "open-hb": "CrIBo (Lebailly et al. 2024) dense nearest-neighbour retrieval table (Pascal VOC); "
                   "open-hummingbird-eval's README protocol: "
                   "512 px squash, memory 10.24M patches, 2 augmented passes, k 30, T 0.02, Hungarian mIoU",
        "open-hb-exact": "as open-hb, with open-hummingbird-eval's std typo (0.229, 0.224, 0.255)",
    },
}
DATA_KIND = {"knn": "imagenet", "linear": "imagenet", "voc-linear": "voc", "hummingbird": "voc"}


@dataclass
class ProtocolResult:
    """One protocol's outcome: its metrics, the trivial floors, the settings it ran with and its time."""

    protocol: str
    preset: str
    paper: str
    metrics: dict[str, float]
    floors: dict[str, float]
    settings: dict[str, Any]
    seconds: float
    card: dict[str, Any] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    per_seed: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EvaluationReport:
    """All results of one ``evaluate`` call."""

    model: str
    precision: str
    processes: int
    results: list[ProtocolResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A plain-text table: protocol, preset, metric, value (mean ± std over seeds), floors, and each
        result's protocol card."""
        lines = [f"model: {self.model}   precision: {self.precision}   processes: {self.processes}",
                 f"{'protocol':<12} {'preset':<14} {'metric':<18} {'value':>17}   floors"]
        for result in self.results:
            floors = ", ".join(f"{k} {v:.4f}" for k, v in result.floors.items())
            for position, (metric, value) in enumerate(result.metrics.items()):
                if metric == "memory_entries":
                    shown = f"{int(value):17d}"
                elif metric in result.std:
                    shown = f"{value:8.4f} ± {result.std[metric]:.4f}"
                else:
                    shown = f"{value:17.4f}"
                lines.append(f"{result.protocol:<12} {result.preset:<14} {metric:<18} {shown}   "
                             f"{floors if position == 0 else ''}")
            if result.card:
                lines.append(f"{'':<12} card: " + "; ".join(f"{k} {v}" for k, v in result.card.items()))
            lines.append(f"{'':<12} settings: {json.dumps(result.settings, default=str)}")
            lines.append(f"{'':<12} reproduces: {result.paper}")
        return "\n".join(lines)

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """``evaluation.json`` and ``evaluation.txt`` in ``folder`` (process 0 only); returns their paths."""
        folder = Path(folder)
        json_path, table_path = folder / "evaluation.json", folder / "evaluation.txt"
        if distributed.rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
            table_path.write_text(self.table() + "\n")
        return json_path, table_path


def _settings_type(protocol: str, preset: str) -> type:
    """The settings dataclass ``protocol`` runs with under ``preset`` (a known pair)."""
    if protocol == "knn":
        return KNNSettings
    if protocol == "linear":
        return type(LINEAR_PRESETS[preset])
    if protocol == "voc-linear":
        return type(VOC_LINEAR_PRESETS[preset])
    return HummingbirdSettings


def check_settings(protocol: str, preset: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    """The preset ``protocol`` runs (its default for ``None``), after checking the protocol, the preset and the
    names of ``overrides`` (a ``ValueError`` naming the unknown one); reads no model and no data."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    presets = PRESETS[protocol]
    preset = preset or next(iter(presets))
    if preset not in presets:
        raise ValueError(f"{protocol}: unknown preset {preset!r}; choose from {', '.join(presets)}")
    names = {field.name for field in dataclasses.fields(_settings_type(protocol, preset))}
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise ValueError(f"{protocol}: unknown setting(s) {unknown}; known: {', '.join(sorted(names))}")
    return preset


def resolve_settings(protocol: str, preset: str | None, backbone: Any, overrides: dict[str, Any] | None = None) -> Any:
    """The settings dataclass of ``protocol`` under ``preset`` (``None``: the default), with ``overrides``."""
    preset = check_settings(protocol, preset, overrides)
    if protocol == "knn":
        settings: Any = KNNSettings()
    elif protocol == "linear":
        settings = linear_preset(preset, backbone)
    elif protocol == "voc-linear":
        settings = VOC_LINEAR_PRESETS[preset]
    else:
        settings = HummingbirdSettings(std="open-hb" if preset == "open-hb-exact" else "imagenet")
    return dataclasses.replace(settings, **overrides) if overrides else settings


def check_roots_given(protocols: Sequence[str], imagenet: str | None, voc: str | None,
                      seg_dataset: str = "voc") -> None:
    """A ``ValueError`` naming the option when a protocol's data root is not given (nothing is read).
    ``voc`` is the root of the segmentation protocols, whatever ``seg_dataset`` is."""
    if seg_dataset not in SEGMENTATION_DATASETS:
        raise ValueError(f"unknown seg_dataset {seg_dataset!r}; choose from {', '.join(SEGMENTATION_DATASETS)}")
    for protocol in protocols:
        kind = DATA_KIND[protocol]
        if (imagenet if kind == "imagenet" else voc) is None:
            if kind == "imagenet":
                raise ValueError(f"{protocol} needs an ImageNet-layout root: pass --imagenet <folder> "
                                 "(imagenet= in Python)")
            what = "a Pascal VOC" if seg_dataset == "voc" else f"a {seg_dataset}"
            raise ValueError(f"{protocol} needs {what} root: pass --seg_root <folder> (or --voc <folder>; "
                             "seg_root= or voc= in Python)")


def check_data(protocols: Sequence[str], imagenet: str | None, voc: str | None, voc_classes: int = 21,
               seg_dataset: str = "voc") -> None:
    """An ``EvalDataError`` naming the problem unless every data set the protocols will read exists in its
    layout, is not empty, its first item reads and its masks have their images' sizes (``check_dataset``)."""
    check_roots_given(protocols, imagenet, voc, seg_dataset)
    for protocol in protocols:
        kind = DATA_KIND[protocol]
        root = imagenet if kind == "imagenet" else voc
        for split in ("train", "val"):
            if kind == "imagenet":
                check_dataset(imagenet_split(root, split, lambda image, index: image), f"{root}/{split}")
            else:
                pairs = segmentation_split(seg_dataset, root, split, lambda image, mask, index: (image, mask),
                                           protocol, voc_classes)
                what = "VOC" if seg_dataset == "voc" else seg_dataset
                check_dataset(pairs, f"{what} {split} of {root}")


def evaluate(
    model: str | Path | nn.Module,
    protocols: Sequence[str] = ("knn",),
    imagenet: str | None = None,
    voc: str | None = None,
    voc_classes: int = 21,
    seg_dataset: str = "voc",
    seg_root: str | None = None,
    image_size: int | None = None,
    seeds: int = 1,
    presets: dict[str, str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    official: str | None = None,
    teacher: bool = True,
    precision: str = "32",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    output: str | Path | None = None,
    cache_dir: str | Path | None = None,
    show_progress: bool = True,
    timm_kwargs: dict[str, Any] | None = None,
    trust_checkpoint: bool = False,
) -> EvaluationReport:
    """Run the papers' evaluation protocols on a backbone.

    Under ``torch.distributed`` (e.g. ``torchrun``) every process must call this; the results equal a
    one-process run. Every result carries its protocol card (``ProtocolResult.card``).

    Args:
        model: an ``SSLModule``, a ``Backbone``, a ``.ckpt`` of this library, an exported ``backbone.pt``, an
            official checkpoint (with ``official``) or a timm model name.
        protocols: any of ``knn``, ``linear``, ``voc-linear``, ``hummingbird``.
        imagenet: root with ``train/<class>/*`` and ``val/<class>/*`` (``knn``, ``linear``).
        voc: Pascal VOC root (``voc-linear``, ``hummingbird``).
        voc_classes: classes of the VOC-layout masks, background included (21 for Pascal VOC; the synthetic
            scenes have ``num_object_classes + 1``, 7 for the quickstart's).
        seg_dataset: the segmentation data set of ``voc-linear`` and ``hummingbird``: ``voc``, ``ade20k``,
            ``cityscapes`` or ``coco-stuff`` (read as open-hummingbird-eval reads them; docs/evaluation.md).
        seg_root: the root of ``seg_dataset`` (default: ``voc``).
        image_size: the input size the presets' image sizes are scaled to (ratio ``image_size / 224``; crops and
            Hummingbird's 512 px alike). Default: the model's own input size when it is below 224 px (e.g. 32
            for the quickstart's ViT), else the papers' sizes; 224 keeps the presets exact.
        seeds: runs of each seeded protocol (``linear``, ``voc-linear``, ``hummingbird``) with seeds
            ``seed, seed + 1, ...``; the metrics are their mean, ``std`` their sample std, ``per_seed`` each run's.
        presets: ``protocol -> preset`` (defaults: the first of ``PRESETS[protocol]``).
        overrides: ``protocol -> {setting: value}`` on top of the preset (e.g. fewer epochs); a size given here
            is used as it is (not scaled).
        official: method of an official checkpoint (``cribo``, ``bam``, ``vicregl``).
        teacher: evaluate the teacher backbone where the method has one (as CrIBo and BAM do).
        precision: ``"32"`` (default), ``"bf16"`` or ``"16"``.
        device: where to run (default: this process's CUDA device if there is one, else CPU).
        batch_size: images per feature-extraction batch and process.
        num_workers: loader workers per process.
        output: folder for ``evaluation.json`` and ``evaluation.txt``.
        cache_dir: keep extracted features on disk between runs (keyed by the weights).
        show_progress: progress bars on process 0.
        timm_kwargs: ``timm.create_model`` arguments for a timm name.
        trust_checkpoint: read a model file with full unpickling (the trust rule of
            ``ssl_modules.checkpoints.reading``: it can run code from the file, so only for files you trust).
    """
    protocols = list(dict.fromkeys(protocols))
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: run each seeded protocol at least once (--seeds 1 or more)")
    seg_root = seg_root if seg_root is not None else voc
    check_roots_given(protocols, imagenet, seg_root, seg_dataset)
    presets = dict(presets or {})
    given = {protocol: dict(values) for protocol, values in (overrides or {}).items()}
    for protocol in protocols:
        check_settings(protocol, presets.get(protocol), given.get(protocol))
    backbone = load_backbone(model, official=official, teacher=teacher, trust_checkpoint=trust_checkpoint,
                             **(timm_kwargs or {}))
    rule = size_rule(backbone, image_size)
    settings = {}
    for protocol in protocols:
        values = dict(given.get(protocol, {}))
        if DATA_KIND[protocol] == "voc":
            values.setdefault("num_classes", segmentation_classes(seg_dataset, seg_root, protocol, voc_classes))
        base = scaled_settings(protocol, resolve_settings(protocol, presets.get(protocol), backbone), rule, values)
        settings[protocol] = dataclasses.replace(base, **values) if values else base
    check_data(protocols, imagenet, seg_root, voc_classes, seg_dataset)
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    was_training = backbone.training
    data = _Data(imagenet, seg_root, seg_dataset)
    try:
        report = _run_protocols(model, backbone, protocols, settings, presets, data, rule, seeds, precision, device,
                                batch_size, num_workers, show_progress, cache_dir)
    finally:
        backbone.train(was_training)
    if output is not None:
        report.write(output)
    return report


@dataclass(frozen=True)
class _Data:
    imagenet: str | None
    seg_root: str | None
    seg_dataset: str

    def described(self, protocol: str) -> str:
        if DATA_KIND[protocol] == "imagenet":
            return f"ImageNet layout {self.imagenet}"
        return f"{self.seg_dataset} {self.seg_root}"


def _run_protocols(model: Any, backbone: Any, protocols: list[str], settings: dict[str, Any],
                   presets: dict[str, str], data: _Data, rule: SizeRule, seeds: int, precision: str, device: Any,
                   batch_size: int, num_workers: int, show_progress: bool, cache_dir: Any) -> EvaluationReport:
    extractor = Extractor(backbone, device, precision, batch_size, num_workers, show_progress,
                          FeatureCache(Path(cache_dir) if cache_dir else None))
    report = EvaluationReport(describe_source(model), precision, distributed.world_size())
    runners = {"knn": lambda s: run_knn(extractor, data.imagenet, s),
               "linear": lambda s: run_linear(extractor, data.imagenet, s),
               "voc-linear": lambda s: run_voc_linear(extractor, data.seg_root, s, data.seg_dataset),
               "hummingbird": lambda s: run_hummingbird(extractor, data.seg_root, s, data.seg_dataset)}
    for protocol in protocols:
        start = time.perf_counter()
        runs = [settings[protocol]]
        if protocol in SEEDED:
            runs = [dataclasses.replace(settings[protocol], seed=settings[protocol].seed + i) for i in range(seeds)]
        outcomes = [runners[protocol](run) for run in runs]
        per_seed = [metrics for metrics, _ in outcomes]
        metrics, std = mean_and_std(per_seed)
        preset = presets.get(protocol) or next(iter(PRESETS[protocol]))
        card = protocol_card(protocol, preset, settings[protocol], data.described(protocol), rule,
                             [run.seed for run in runs] if protocol in SEEDED else [])
        report.results.append(ProtocolResult(protocol, preset, PRESETS[protocol][preset], metrics, outcomes[0][1],
                                             _plain(settings[protocol]), time.perf_counter() - start, card,
                                             std if len(runs) > 1 else {}, per_seed if protocol in SEEDED else []))
    return report


def _plain(settings: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(settings).items() if k != "paper"}
