"""Offline evaluation with the papers' protocols: ``evaluate(model, protocols, ...)`` and
``python -m ssl_modules evaluate`` (see ``docs/evaluation.md``).

Protocols: ``knn`` (DINO), ``linear`` (DINO / BAM / VICRegL recipes), ``voc-linear`` (CrIBo / VICRegL),
``hummingbird`` (open-hummingbird-eval). Features are float32 by default, extracted once per evaluation and
shared between protocols; under ``torch.distributed`` the results equal a one-process run.
"""
from .api import PRESETS, PROTOCOLS, EvaluationReport, ProtocolResult, evaluate, resolve_settings
from .datasets import EvalDataError
from .hummingbird import HummingbirdSettings
from .knn import KNNSettings, knn_classify
from .linear import LinearSettings
from .metrics import hungarian_assignment, hungarian_miou
from .models import ModelSourceError, load_backbone
from .voc_linear import VOCLinearSettings

__all__ = ["evaluate", "load_backbone", "PROTOCOLS", "PRESETS", "EvaluationReport", "ProtocolResult",
           "resolve_settings", "KNNSettings", "LinearSettings", "VOCLinearSettings", "HummingbirdSettings",
           "knn_classify", "hungarian_assignment", "hungarian_miou", "EvalDataError", "ModelSourceError"]
