"""Optimizers and their parameter groups.

LARS follows the rule of the official VICRegL / BAM code (the trust ratio uses the norm of the decayed
update ``g + wd * p``), which ``timm.optim.Lars`` approximates with ``||g|| + wd ||p||``; the difference is
tiny, but the official rule is ten lines and exact.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["LARS", "parameter_groups", "build_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("adamw", "sgd", "lars")


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum (You et al., 2017), as the official SSL codes use it.

    For every parameter of a group with ``lars_exclude=False``: ``u = g + weight_decay * p``, then
    ``u *= eta * ||p|| / ||u||`` when both norms are positive. Groups with ``lars_exclude=True`` (biases and
    norm parameters) get neither weight decay nor the adaptation. Then ``mu = momentum * mu + u`` and
    ``p -= lr * mu``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 1e-3,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0 and eta > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=lars_exclude)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["eta"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def _is_decayed(name: str, param: nn.Parameter) -> bool:
    """Biases and 1-d parameters (norm weights) are kept out of weight decay."""
    return param.ndim > 1 and not name.endswith(".bias")


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_schedules: Mapping[str, Callable[[str], bool]] | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict]:
    """Groups of the trainable parameters: decayed (``ndim > 1``, not a bias) and not decayed, per LR schedule.

    Every group carries ``decayed`` (bool) so that a weight-decay schedule knows which to change,
    ``lars_exclude`` for LARS, and ``lr_schedule``: the name of the schedule its learning rate follows
    (``"lr"``, or the first name of ``lr_schedules`` whose predicate accepts the parameter's name; e.g.
    CrIBo's ``{"last_layer_lr": lambda n: "last_layer" in n}``). ``name`` is ``<schedule>/decay`` or
    ``<schedule>/no_decay``. ``lr_scales`` (parameter name -> factor; layer-wise decay) splits the groups
    further: a group's ``lr_scale`` multiplies its scheduled learning rate, and its name ends in
    ``@<scale>`` when the scale is not 1.
    """
    selectors, scales = dict(lr_schedules or {}), dict(lr_scales or {})
    buckets: dict[tuple[str, bool, float], list[nn.Parameter]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        schedule = next((key for key, accepts in selectors.items() if accepts(name)), "lr")
        buckets.setdefault((schedule, _is_decayed(name, param), scales.get(name, 1.0)), []).append(param)
    order = ["lr", *selectors]
    groups = []
    for schedule in order:
        for decayed in (True, False):
            for scale in sorted({key[2] for key in buckets if key[:2] == (schedule, decayed)}, reverse=True):
                name = f"{schedule}/{'decay' if decayed else 'no_decay'}" + ("" if scale == 1.0 else f"@{scale:.4g}")
                groups.append({"params": buckets[(schedule, decayed, scale)],
                               "weight_decay": weight_decay if decayed else 0.0, "decayed": decayed,
                               "lars_exclude": not decayed, "lr_schedule": schedule, "lr_scale": scale,
                               "name": name})
    return groups


def build_optimizer(
    name: str,
    groups: list[dict],
    lr: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eta: float = 1e-3,
) -> torch.optim.Optimizer:
    """AdamW, SGD (momentum) or LARS over ``groups`` from :func:`parameter_groups`."""
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
