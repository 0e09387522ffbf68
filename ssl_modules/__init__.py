"""PyTorch Lightning modules for self-supervised learning of dense and object-level visual features.

The public names are loaded on first use, so that ``import ssl_modules.functional`` (pure torch) does not
pull in Lightning.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SSLModule": "ssl_modules.methods.base",
    "Backbone": "ssl_modules.networks.backbones",
    "Features": "ssl_modules.contracts",
    "Views": "ssl_modules.contracts",
    "VICRegL": "ssl_modules.methods.vicregl",
    "BAM": "ssl_modules.methods.bam",
    "CrIBo": "ssl_modules.methods.cribo",
    "load_official": "ssl_modules.methods.official",
    "save_official": "ssl_modules.methods.official",
    "load_backbone_weights": "ssl_modules.methods.official",
    "ExactResume": "ssl_modules.run.resume",
    "ObjectMemoryBank": "ssl_modules.methods.memory_bank",
    "ShardedObjectMemoryBank": "ssl_modules.methods.sharded_bank",
    "PerformanceOptions": "ssl_modules.run.performance",
    "FSDP2Strategy": "ssl_modules.run.sharding",
    "NonFiniteGuard": "ssl_modules.run.guard",
    "NonFiniteLossError": "ssl_modules.run.guard",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from ssl_modules.contracts import Features, Views
    from ssl_modules.methods.bam import BAM
    from ssl_modules.methods.base import SSLModule
    from ssl_modules.methods.cribo import CrIBo
    from ssl_modules.methods.memory_bank import ObjectMemoryBank
    from ssl_modules.methods.sharded_bank import ShardedObjectMemoryBank
    from ssl_modules.methods.official import load_backbone_weights, load_official, save_official
    from ssl_modules.methods.vicregl import VICRegL
    from ssl_modules.networks.backbones import Backbone
    from ssl_modules.run.guard import NonFiniteGuard, NonFiniteLossError
    from ssl_modules.run.performance import PerformanceOptions
    from ssl_modules.run.sharding import FSDP2Strategy
    from ssl_modules.run.resume import ExactResume


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssl_modules' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
