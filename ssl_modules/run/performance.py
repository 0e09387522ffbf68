"""Speed and memory options for big runs: compiled backbones, gradient checkpointing, channels-last CNNs.

Each option is a function of a module and the :class:`PerformanceOptions` callback applies them when fit
starts, so a YAML config switches them on without touching the method's hyper-parameters::

    trainer:
      callbacks:
        - class_path: ssl_modules.PerformanceOptions
          init_args: {compile_backbone: true, grad_checkpointing: true}

What each one gains, and the measured numbers: docs/performance.md. None of them changes the maths: a
compiled or checkpointed backbone gives the same features (to float rounding), and checkpoint keys stay
the same (the backbone is compiled in place, ``nn.Module.compile``).
"""
from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

__all__ = ["PerformanceOptions", "compile_backbones", "set_grad_checkpointing", "channels_last_backbones"]


def _backbones(module: nn.Module, student_only: bool = False) -> list[nn.Module]:
    """The student backbone and, unless ``student_only``, the EMA teacher's."""
    found = [module.backbone]
    teacher = getattr(module, "teacher", None)
    if not student_only and teacher is not None and "backbone" in teacher:
        found.append(teacher["backbone"])
    return found


class _GuardedCompile:
    """The compiled call of a module; if compiling fails at the first call, warn once and run eagerly."""

    def __init__(self, module: nn.Module, kwargs: dict[str, Any]) -> None:
        self.module = module
        self.compiled = torch.compile(module._call_impl, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.compiled(*args, **kwargs)
        except Exception as error:  # any compiler failure: the eager module is always a correct fallback
            warnings.warn(
                f"torch.compile of {type(self.module).__name__} failed ({type(error).__name__}: {error}); "
                "running it eagerly. Set compile_backbone=False to silence this.", stacklevel=2,
            )
            self.module._compiled_call_impl = None
            return self.module._call_impl(*args, **kwargs)


def compile_backbones(module: nn.Module, **compile_kwargs: Any) -> None:
    """Compile the student's and the teacher's backbone in place (``torch.compile`` arguments pass through).

    Keys of the state dict do not change. If compiling fails on the first call (no compiler toolchain,
    an unsupported op), the backbone warns once and runs eagerly.
    """
    for backbone in _backbones(module):
        backbone._compiled_call_impl = _GuardedCompile(backbone, compile_kwargs)


def set_grad_checkpointing(module: nn.Module, enable: bool = True) -> None:
    """timm's activation checkpointing in the student backbone (the teacher keeps no activations).

    Trades one extra forward of each block in the backward pass for not storing the blocks' activations:
    about 30 % more backbone time for several times less activation memory (ViTs: per block).
    """
    model = module.backbone.model
    if not hasattr(model, "set_grad_checkpointing"):
        raise ValueError(f"{type(model).__name__} has no timm set_grad_checkpointing: gradient checkpointing "
                         "needs a timm model that supports it (ViT, ResNet, ConvNeXt, ...)")
    model.set_grad_checkpointing(enable)


def channels_last_backbones(module: nn.Module) -> None:
    """CNN backbones' weights in channels-last format (the crops follow in ``SSLModule.encode``); ViTs skip."""
    for backbone in _backbones(module):
        if not getattr(backbone, "is_vit", False):
            backbone.to(memory_format=torch.channels_last)


class PerformanceOptions(pl.Callback):
    """Applies the options when fit starts, before the first step.

    Args:
        compile_backbone: ``torch.compile`` the backbones (with an eager fallback and a warning).
        compile_kwargs: arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
        grad_checkpointing: activation checkpointing of the student backbone (timm).
        channels_last: channels-last weights for CNN backbones (use with the module's ``channels_last``).
    """

    def __init__(self, compile_backbone: bool = False, compile_kwargs: dict[str, Any] | None = None,
                 grad_checkpointing: bool = False, channels_last: bool = False) -> None:
        self.compile_backbone = compile_backbone
        self.compile_kwargs = dict(compile_kwargs or {})
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = channels_last

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.grad_checkpointing:
            set_grad_checkpointing(pl_module)
        if self.channels_last:
            channels_last_backbones(pl_module)
        if self.compile_backbone:
            compile_backbones(pl_module, **self.compile_kwargs)
