"""Training a head on a frozen backbone, shared by ``linear`` and ``voc-linear``: the optimizers and LR
schedules of the papers' recipes, seeded global batches split between processes, gradients summed over them.

Under DDP every process computes the loss of its slice of each global batch, divided by the global batch
size, and the gradients are summed: the update is the one-process update (up to float summation order;
heads with BatchNorm see per-process statistics, as the papers' SyncBatchNorm-less runs do not).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssl_modules.run import distributed

__all__ = ["HeadRecipe", "build_optimizer", "lr_factor", "global_batches", "local_slice", "sum_gradients_",
           "broadcast_parameters_"]


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
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}; use 'sgd', 'adam' or 'adamw'")
        if self.schedule not in ("cosine", "poly"):
            raise ValueError(f"schedule={self.schedule!r}; use 'cosine' or 'poly'")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError(f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} and "
                             f"warmup_steps={self.warmup_steps} >= 0")


def build_optimizer(head: nn.Module, recipe: HeadRecipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over the head's parameters."""
    parameters = [p for p in head.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(parameters, lr=recipe.lr, weight_decay=recipe.weight_decay)


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


def global_batches(size: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> list[list[int]]:
    """Seeded shuffled global batches of ``range(size)`` for one epoch."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, size, batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def local_slice(batch: list[int]) -> list[int]:
    """This process's contiguous part of a global batch."""
    rank, world = distributed.rank(), distributed.world_size()
    bounds = [round(len(batch) * r / world) for r in range(world + 1)]
    return batch[bounds[rank]:bounds[rank + 1]]


def sum_gradients_(module: nn.Module) -> None:
    """Sum every gradient over processes (no-op without DDP)."""
    distributed.sum_([parameter.grad for parameter in module.parameters() if parameter.grad is not None])


def broadcast_parameters_(module: nn.Module) -> None:
    """Process 0's parameters and buffers on every process (no-op without DDP)."""
    distributed.broadcast_([tensor.data for tensor in [*module.parameters(), *module.buffers()]])


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
