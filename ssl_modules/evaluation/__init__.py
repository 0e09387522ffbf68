"""Offline evaluation with the papers' protocols: ``evaluate(model, protocols, ...)`` and
``python -m ssl_modules evaluate`` (see ``docs/evaluation.md``).

Protocols: ``knn`` (DINO), ``linear`` (DINO / BAM / VICRegL recipes), ``voc-linear`` (CrIBo / VICRegL),
``hummingbird`` (open-hummingbird-eval); segmentation on Pascal VOC, ADE20K, Cityscapes or COCO-Stuff
(``layouts``); sizes scaled to a small model's input (``sizes``); a protocol card on every result
(``cards``). Features are float32 by default, extracted once per evaluation and shared between protocols;
under ``torch.distributed`` the results equal a one-process run.

The modules of the evaluation core are shared with the online probes of ``callbacks`` (the probes are a
second front end of the same extraction, search, votes, retrieval, metrics and head training). Names are
imported on first use, so that importing one core module does not pull in every protocol.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "api", "PROTOCOLS": "api", "PRESETS": "api", "EvaluationReport": "api", "ProtocolResult": "api",
    "resolve_settings": "api", "check_data": "api", "EvalDataError": "checks", "HummingbirdSettings": "hummingbird",
    "KNNSettings": "knn", "knn_classify": "knn", "LinearSettings": "linear", "hungarian_assignment": "metrics",
    "hungarian_miou": "metrics", "VOCLinearSettings": "voc_linear",
    "SEGMENTATION_DATASETS": "layouts", "segmentation_split": "layouts", "segmentation_classes": "layouts",
    "SizeRule": "sizes", "size_rule": "sizes", "protocol_card": "cards",
    "ModelSourceError": "ssl_modules.evaluation.sources", "load_backbone": "ssl_modules.evaluation.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssl_modules.evaluation' has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
