"""Protocol cards: the settings that made a number, carried by every result of ``evaluate``.

A number without its protocol is worth little (the same backbone scores several mIoU points apart when the
masks are resized differently), so each ``ProtocolResult`` holds a card: the preset, the data set and split,
the resolution (and how it was chosen), the memory size, k, temperature, the matching of the metric, the
seeds and the version of this library. The card is in ``evaluation.json`` and in the printed table.
"""
from __future__ import annotations

import math
from importlib import metadata
from typing import Any

__all__ = ["SEEDED", "library_version", "protocol_card", "mean_and_std"]

# the protocols whose result depends on a seed (augmentation, sampling, head initialisation)
SEEDED = ("linear", "voc-linear", "hummingbird")
_SPLITS = {"knn": "bank train, queries val", "linear": "train head on train, score val",
           "voc-linear": "train head on train (train_aug for VOC when present), score val",
           "hummingbird": "memory from train, queries val"}


def library_version() -> str:
    """The installed version of ``ssl-modules`` (``unknown`` when it is not installed as a distribution)."""
    try:
        return metadata.version("ssl-modules")
    except metadata.PackageNotFoundError:
        return "unknown"


def protocol_card(protocol: str, preset: str, settings: Any, data: str, rule: Any, seeds: list[int]) -> dict[str, Any]:
    """The card of one result: what a reader needs to compare the number with another one."""
    card: dict[str, Any] = {"protocol": protocol, "preset": preset, "data": data, "split": _SPLITS[protocol],
                            "resolution": _resolution(protocol, settings), "size_rule": rule.reason}
    if protocol == "knn":
        card.update(memory_size="the whole train set", k=list(settings.ks), temperature=settings.temperature,
                    matching="none (top-1/top-5 of the weighted vote)")
    elif protocol == "hummingbird":
        card.update(memory_size=settings.memory_size if settings.memory_size is not None else "every patch",
                    k=settings.k, temperature=settings.temperature,
                    matching="Hungarian (miou), identity (miou_identity)")
    elif protocol == "voc-linear":
        card.update(matching="identity", iterations=settings.iterations, batch_size=settings.batch_size)
    else:
        card.update(matching="none (top-1/top-5)", epochs=settings.epochs, batch_size=settings.batch_size,
                    augmentation="RandomResizedCrop + flip, new each epoch" if settings.augment else
                    "none: features of the centre crops, extracted once (not a paper's recipe)")
    card.update(seeds=seeds if seeds else "deterministic (no seed)", version=library_version())
    return card


def _resolution(protocol: str, settings: Any) -> str:
    if protocol in ("knn", "linear"):
        return (f"{settings.image_size} px crops (val: short side {round(settings.image_size * 256 / 224)}, "
                "centre crop)")
    if protocol == "hummingbird":
        return f"{settings.input_size} x {settings.input_size} px (squashed)"
    return f"short side {settings.crop_size} px, {settings.crop_size} px windows every {settings.stride} px"


def mean_and_std(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """The mean of each metric over the runs and its sample standard deviation (0 for one run)."""
    means, stds = {}, {}
    for name in runs[0]:
        values = [run[name] for run in runs]
        mean = sum(values) / len(values)
        means[name] = mean
        spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        stds[name] = math.sqrt(spread)
    return means, stds
