"""Offline evaluation with the papers' protocols: ``evaluate(model, protocols, ...)`` and
``python -m ssl_modules evaluate`` (see ``docs/evaluation.md``).

Protocols: ``knn`` (DINO), ``linear`` (DINO / BAM / VICRegL recipes), ``voc-linear`` (CrIBo / VICRegL),
``hummingbird`` (open-hummingbird-eval). Features are float32 by default, extracted once per evaluation and
shared between protocols; under ``torch.distributed`` the results equal a one-process run.

Names are imported on first use, so that ``ssl_modules.evaluation.search`` (used by the online probes)
does not pull in the data sets and protocols.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "api", "PROTOCOLS": "api", "PRESETS": "api", "EvaluationReport": "api", "ProtocolResult": "api",
    "resolve_settings": "api", "EvalDataError": "datasets", "HummingbirdSettings": "hummingbird",
    "KNNSettings": "knn", "knn_classify": "knn", "LinearSettings": "linear", "hungarian_assignment": "metrics",
    "hungarian_miou": "metrics", "ModelSourceError": "models", "load_backbone": "models",
    "VOCLinearSettings": "voc_linear",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssl_modules.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
