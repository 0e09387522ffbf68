"""Training a head on frozen features, shared by the protocols (``linear``, ``voc-linear``) and the online probes:
the head optimizers, the LR schedules of the papers' recipes, seeded head initialisation, gradients summed
over processes and the final head broadcast from process 0 (seeded global batches: ``batches``).

Under DDP every process computes the loss of its slice of each global batch, divided by the global batch
size, and the gradients are summed: the update is the one-process update (up to float summation order;
heads with BatchNorm see per-process statistics, as the papers' SyncBatchNorm-less runs do not).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from ssl_modules.run import distributed

__all__ = ["HEAD_OPTIMIZERS", "HeadRecipe", "head_optimizer", "recipe_optimizer", "lr_factor", "set_lr_",
           "sum_gradients_", "broadcast_module_", "normal_init_", "seeded_head", "train_step"]

HEAD_OPTIMIZERS = ("sgd", "adam", "adamw")
Head = TypeVar("Head", bound=nn.Module)


@dataclass(frozen=True)
class HeadRecipe:
    """Optimizer and schedule of a head.

    Attributes:
        optimizer: ``"sgd"`` (momentum 0.9), ``"adam"`` (L2 weight decay, as mmseg's Adam) or ``"adamw"``.
        lr: peak learning rate (already scaled for the batch size).
        weight_decay: weight decay.
        schedule: ``"cosine"`` (to 0), ``"poly"`` (``(1 - t)^power`` down to ``min_lr``) or ``"step"``.
        power: exponent of the poly schedule.
        min_lr: floor of the poly schedule.
        warmup_steps: linear warm-up steps (from ``lr * warmup_ratio``).
        warmup_ratio: start of the warm-up as a fraction of ``lr``.
    """

    optimizer: str = "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    power: float = 1.0
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 1e-6

    def __post_init__(self) -> None:
        if self.optimizer not in HEAD_OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}; use 'sgd', 'adam' or 'adamw'")
        if self.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule={self.schedule!r}; use 'cosine' or 'poly'")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                             f"warmup_steps={self.warmup_steps} >= 0")


def head_optimizer(head: nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD (with ``momentum``), Adam (L2 weight decay, as mmseg's) or AdamW over the head's trainable parameters."""
    parameters = [p for p in head.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r}; use one of {', '.join(HEAD_OPTIMIZERS)}")


def recipe_optimizer(head: nn.Module, recipe: HeadRecipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the head's parameters (SGD with momentum 0.9)."""
    return head_optimizer(head, recipe.optimizer, recipe.lr, recipe.weight_decay)


def lr_factor(recipe: HeadRecipe, progress_step: int, total: int) -> float:
    """The learning rate at ``progress_step`` of ``total`` (steps or epochs, as the recipe counts them)."""
    if progress_step < recipe.warmup_steps:
        start = recipe.lr * recipe.warmup_ratio
        return start + (recipe.lr - start) * progress_step / recipe.warmup_steps
    t = min(progress_step / max(total, 1), 1.0)
    if recipe.schedule == "cosine":
        return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return (recipe.lr - recipe.min_lr) * (1.0 - t) ** recipe.power + recipe.min_lr


def set_lr_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def sum_gradients_(module: nn.Module) -> None:
    """Sum every gradient over processes (no-op without DDP)."""
    distributed.sum_([parameter.grad for parameter in module.parameters() if parameter.grad is not None])


@torch.no_grad()
def broadcast_module_(module: nn.Module, source: int = 0) -> None:
    """Copy ``source``'s parameters and buffers into every process's ``module`` (no-op when not distributed).

    Identical updates on every process already give identical heads; this removes the last bits of difference
    that non-deterministic kernels (e.g. CUDA's bilinear upsampling backward) could leave.
    """
    distributed.broadcast_([tensor.data for tensor in [*module.parameters(), *module.buffers()]], source)


def seeded_head(build: Callable[[torch.Generator], Head], seed: int, device: torch.device) -> Head:
    """``build(generator)`` with a generator seeded by ``seed``, on ``device``; the layers' default
    initialisation runs under a forked RNG, so that the global random generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return build(torch.Generator().manual_seed(seed)).to(device)


def normal_init_(layer: nn.Module, std: float = 0.01) -> nn.Module:
    """Weights ~ N(0, std), bias 0 (DINO's and mmseg's linear heads)."""
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def train_step(head: nn.Module, optimizer: torch.optim.Optimizer, loss_sum: Callable[[], Tensor],
               global_count: int) -> float:
    """One update: this process's summed loss over the global count, gradients summed over processes."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_sum() / global_count
    loss.backward()
    sum_gradients_(head)
    optimizer.step()
    return float(loss.detach())
