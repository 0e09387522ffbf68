"""Building a probe head and its optimizer: seeded without touching the global random generator."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PROBE_OPTIMIZERS", "seeded_head", "probe_optimizer"]

PROBE_OPTIMIZERS = ("sgd", "adamw")


def seeded_head(build: Callable[[torch.Generator], nn.Module], seed: int, device: torch.device) -> nn.Module:
    """``build(generator)`` with a generator seeded by ``seed``, on ``device``; the layers' default
    initialisation runs under a forked RNG so that the method's training does not depend on the probes."""
    with torch.random.fork_rng(devices=[]):
        return build(torch.Generator().manual_seed(seed)).to(device)


def probe_optimizer(head: nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (with ``momentum``) or AdamW over the head's parameters."""
    if name == "sgd":
        return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r}; use one of {', '.join(PROBE_OPTIMIZERS)}")
