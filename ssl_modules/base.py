"""``SSLModule``: what every method shares — backbone, optimizer, closed-form schedules, ``embed`` for probes."""
from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor, nn

from . import distributed
from .backbones import Backbone, Features
from .optim import OPTIMIZERS, build_optimizer, parameter_groups
from .schedules import StepSchedule

__all__ = ["SSLModule"]


def _batch_size(batch: Any) -> int:
    """Images per process in a training batch (``Views`` or a tuple whose first item is a tensor)."""
    index = getattr(batch, "index", None)
    if isinstance(index, Tensor):
        return index.shape[0]
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, (tuple, list)):
        first = first[0]
    return first.shape[0]


class SSLModule(pl.LightningModule):
    """Base of every method: owns the student backbone, the optimizer and the schedules.

    Subclasses build their heads in ``__init__`` and write ``training_step``; everything else — parameter
    groups that keep biases and norm weights out of weight decay, the learning-rate warm-up and cosine,
    the weight-decay cosine, gradient clipping, ``embed`` for probes, backbone export — lives here.
    Schedules are closed-form functions of ``trainer.global_step``, so a resumed run continues exactly.

    Args:
        backbone: timm model name.
        backbone_kwargs: keyword arguments of ``timm.create_model`` (``img_size``, ``patch_size``,
            ``drop_path_rate``, ...).
        optimizer: ``"adamw"``, ``"sgd"`` or ``"lars"``.
        lr: base learning rate; with ``lr_scaling="linear"`` the peak is ``lr * global_batch / 256``.
        lr_scaling: ``"linear"`` (scale by the global batch / 256) or ``"none"``.
        min_lr: learning rate at the end of the cosine (absolute).
        min_lr_ratio: if set, the final learning rate is ``min_lr_ratio * peak`` instead of ``min_lr``.
        warmup_epochs: epochs of linear learning-rate warm-up from 0 (fractions allowed).
        weight_decay: weight decay (of the decayed group) at the start.
        weight_decay_end: weight decay at the end of a cosine schedule; ``None`` keeps it constant.
        momentum: momentum of SGD and LARS.
        betas: AdamW betas.
        lars_eta: LARS trust coefficient.
        clip_grad: gradient clipping threshold; ``None`` or 0 disables it (the Trainer's own
            ``gradient_clip_val`` is honoured then).
        clip_grad_mode: ``"global_norm"`` (one norm over all parameters) or ``"per_parameter"`` (every
            parameter's gradient clipped to the threshold on its own, as DINO and CrIBo do).
        channels_last: run CNN backbones in channels-last memory format (faster on GPUs).
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["adamw", "sgd", "lars"] = "adamw",
        lr: float = 5e-4,
        lr_scaling: Literal["linear", "none"] = "linear",
        min_lr: float = 1e-6,
        min_lr_ratio: float | None = None,
        warmup_epochs: float = 10.0,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = None,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        lars_eta: float = 1e-3,
        clip_grad: float | None = None,
        clip_grad_mode: Literal["global_norm", "per_parameter"] = "global_norm",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if lr <= 0 or min_lr < 0 or warmup_epochs < 0 or weight_decay < 0:
            raise ValueError("lr must be > 0 and min_lr, warmup_epochs, weight_decay >= 0")
        if clip_grad_mode not in ("global_norm", "per_parameter"):
            raise ValueError(f"clip_grad_mode must be 'global_norm' or 'per_parameter', got {clip_grad_mode!r}")
        self.backbone = self.build_backbone(backbone, dict(backbone_kwargs or {}))
        self.channels_last = channels_last and not self.backbone.is_vit

    # ----------------------------------------------------------------------------------------- parts
    def build_backbone(self, name: str, kwargs: dict[str, Any]) -> Backbone:
        """The student backbone; methods override to pass method-specific options."""
        return Backbone(name, **kwargs)

    @property
    def embedding_backbone(self) -> Backbone:
        """The backbone whose features probes and exports use: the teacher's when there is one."""
        teacher = getattr(self, "teacher", None)
        if isinstance(teacher, nn.ModuleDict) and "backbone" in teacher:
            return teacher["backbone"]
        return self.backbone

    def encode(self, backbone: Backbone, images: Tensor) -> Features:
        """One backbone call, in channels-last format for CNNs when asked."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return backbone(images)

    def forward(self, images: Tensor) -> Features:
        """Student features of a batch of images."""
        return self.encode(self.backbone, images)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Features:
        """Features for probes: the teacher backbone where there is one, in eval mode, without gradients."""
        backbone = self.embedding_backbone
        was_training = backbone.training
        backbone.eval()
        try:
            return self.encode(backbone, images)
        finally:
            backbone.train(was_training)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing: representation quality is measured by the probe callbacks, which run at the end of
        the validation epoch of ``trainer.validate`` (and ``python -m ssl_modules validate``)."""
        return None

    # ------------------------------------------------------------------------------------ schedules
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (Lightning's estimate from max_epochs/max_steps)."""
        return max(int(self.trainer.estimated_stepping_batches), 1)

    @property
    def steps_per_epoch(self) -> float:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            return float(self.trainer.num_training_batches) / max(self.trainer.accumulate_grad_batches, 1)
        return self.total_steps / max_epochs

    def global_batch_size(self, batch: Any) -> int:
        """Images per optimizer step over all processes."""
        return _batch_size(batch) * distributed.world_size() * self.trainer.accumulate_grad_batches

    def schedule(self, batch: Any) -> StepSchedule:
        hp = self.hparams
        peak = hp.lr * (self.global_batch_size(batch) / 256 if hp.lr_scaling == "linear" else 1.0)
        final = peak * hp.min_lr_ratio if hp.min_lr_ratio is not None else hp.min_lr
        warmup = round(hp.warmup_epochs * self.steps_per_epoch)
        if final > peak and not getattr(self, "_warned_min_lr", False):
            self._warned_min_lr = True
            rank_zero_warn(  # once, on one process: every process computes the same schedule
                f"min_lr ({final:g}) is above the peak learning rate ({peak:g} = lr x global batch / 256): the "
                "'decay' raises the learning rate. Lower min_lr (it is absolute) or use min_lr_ratio")
        return StepSchedule(self.total_steps, warmup, peak, final, hp.weight_decay, hp.weight_decay_end)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        schedule = self.schedule(batch)
        step = self.trainer.global_step
        lr, wd = schedule.lr(step), schedule.wd(step)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if group.get("decayed", False):
                    group["weight_decay"] = wd
        self.log_dict({"schedule/lr": lr, "schedule/weight_decay": wd}, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------------ optimizer
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The student's trainable parameters (the teacher is frozen, probes have their own optimizers)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher.")]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = parameter_groups(self.trainable_named_parameters(), hp.weight_decay)
        return build_optimizer(hp.optimizer, groups, lr=hp.lr, momentum=hp.momentum, betas=tuple(hp.betas),
                               eta=hp.lars_eta)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        clip = self.hparams.clip_grad
        if not clip:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.hparams.clip_grad_mode == "global_norm":
            torch.nn.utils.clip_grad_norm_(params, clip)
            return None
        clip_per_parameter_(params, clip)
        return None

    # -------------------------------------------------------------------------------------- logging
    def log_terms(self, terms: Mapping[str, Tensor | float], prefix: str = "train/", sync_dist: bool = False) -> None:
        """Log a loss and its named terms (values already equal on every process need no sync)."""
        values = {f"{prefix}{k}": (v.detach() if isinstance(v, Tensor) else v) for k, v in terms.items()}
        self.log_dict(values, on_step=True, on_epoch=False, sync_dist=sync_dist)
        if f"{prefix}loss" in values:
            self.log("loss", values[f"{prefix}loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)

    # ---------------------------------------------------------------------------------- diagnostics
    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode for the block (no BatchNorm statistics updated, no stochastic depth), then restore
        every submodule's own mode."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            yield
        finally:
            for module, mode in modes.items():
                module.training = mode

    @torch.no_grad()
    def visual_diagnostics(self, batch: Any) -> dict[str, Tensor]:
        """Pictures of what the method does on ``batch``: name -> float image ``(3, H, W)`` in [0, 1].

        The ``VisualDiagnostics`` callback logs them to TensorBoard every N steps. Methods override this
        (CrIBo's object clusters, VICRegL's matched cells, BAM's attention and Sinkhorn targets); the base
        shows nothing.
        """
        return {}

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ssl_module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    @staticmethod
    def load_any(path: str | Path, map_location: str | torch.device = "cpu") -> SSLModule:
        """Load a checkpoint of any ``SSLModule`` subclass (the class is recorded in the checkpoint)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: pass the path of a .ckpt written by a Trainer")
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
        class_path = checkpoint.get("ssl_module_class")
        if class_path is None:
            raise ValueError(f"{path} was not written by an SSLModule (no 'ssl_module_class' entry)")
        module_name, _, class_name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls.load_from_checkpoint(path, map_location=map_location)

    # --------------------------------------------------------------------------------------- export
    def export_backbone(self, path: str | Path) -> Path:
        """Write the (teacher's, where there is one) backbone weights for timm.

        ``path`` gets a plain state dict that
        ``timm.create_model(name, num_classes=0, **model_kwargs).load_state_dict(sd)`` loads strictly;
        ``path.with_suffix(".json")`` records ``name`` and ``model_kwargs``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        backbone = self.embedding_backbone
        torch.save(backbone.timm_state_dict(), path)
        meta = {"name": backbone.name, "model_kwargs": {**backbone.model_kwargs, "num_classes": 0}}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
        return path


def upcast(x: Tensor) -> Tensor:
    """Half-precision tensors to float32 (losses run in at least float32 under autocast); others unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@torch.no_grad()
def clip_per_parameter_(params: list[Tensor], clip: float) -> None:
    """Rescale every gradient whose own l2 norm exceeds ``clip`` to norm ``clip`` (DINO's rule)."""
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)
