"""BAM (Shalam and Korman, ECCV 2024): balanced self-attention matching.

Per step: encode the crops (one backbone call per resolution) -> project all crops in one call -> [EMA
teacher on all crops] -> similarity of every crop to the target crops of the whole global batch ->
balanced (Sinkhorn) targets at a low temperature -> cross-entropy between each global crop's target row
and the attention rows of the other crops of the same image. Follows the official code
(``docs/bam.md``): each process keeps its own rows, the columns and the Sinkhorn span all processes.
Optionally (``contrastive_crop=True``, on in the published runs) the crops are drawn around per-image boxes
found in the teacher's CLS attention, refreshed every ``ccrop_interval`` epochs (the ``callbacks.ContrastiveCrop``
callback).
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import Tensor

from ssl_modules.contracts import Views
from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Backbone, is_vision_transformer_name
from ssl_modules.methods.base import SSLModule
from ssl_modules.methods.contrastive_crop.boxes import check_attention_backbone, check_settings
from ssl_modules.functional import bam_loss
from ssl_modules.networks.heads import MLP
from ssl_modules.methods.multicrop import encode_views
from ssl_modules.methods.teacher import TeacherEMA
from ssl_modules.methods._ranges import check_ranges
from ssl_modules.optimization.schedules import RunPlan, Schedule, linspace_ramp

__all__ = ["BAM"]

MOCOV3_VIT_SMALL_HEADS = 12  # MoCo v3's vit_small (BAM's published ViT-S/16); timm's vit_small has 6


def _row_entropy(p: Tensor) -> Tensor:
    """Mean entropy (nats) of the rows of a row-stochastic matrix."""
    return -(p * torch.log(p.clamp(min=1e-30))).sum(dim=1).mean()


class BAM(TeacherEMA, SSLModule):
    """BAM as a LightningModule. Defaults are the published ViT-S/16 recipe.

    Args:
        backbone: timm model name (``vit_small_patch16_224``, ``vit_base_patch16_224``, ``resnet50``, ...).
        num_global_crops: G, the global crops (the first G views); they give the targets.
        num_target_crops: T, the crops that are columns of the similarity (None: G).
        projector_widths: projector layer widths (``"4096-4096-4096"``).
        projector_norm: ``"none"`` (published with teacher) or ``"batch"`` after the hidden layers.
        projector_last_bn: a non-affine BatchNorm on the projector output (the no-teacher default).
        projector_activation: ``"gelu"`` (ViTs) or ``"relu"`` (ResNet-50).
        teacher: use an EMA teacher for the targets (published: yes).
        ema_momentum: teacher momentum at the start (cosine to 1).
        softmax_temperature: temperature of the source attention (0.1).
        sinkhorn_temperature: entropic regularisation of the balanced targets (0.05).
        sinkhorn_temperature_final: if set, the Sinkhorn temperature moves linearly to this value over the
            first ``sinkhorn_warmup_epochs`` epochs (official ``--reg_final``).
        sinkhorn_warmup_epochs: length of that ramp (30 in the official code).
        num_sinkhorn_iters: Sinkhorn iterations (3).
        positive_masking: drop the entries comparing two crops of one image.
        top_k: keep the k target columns of largest mass per image (128 published; 0 disables).
        mocov3_vit: MoCo v3 ViT (fixed sin-cos position embedding, frozen patch projection, MoCo init).
        contrastive_crop: draw the crops around per-image boxes from the CLS attention of the last block
            (ContrastiveCrop adapted to ViTs; ViT backbones only; needs a ``datamodules.PretrainDataModule``).
            Published: on. Off by default.
        ccrop_alpha: the crops' position within a box is drawn from ``Beta(alpha, alpha)`` (0.6).
        ccrop_box_threshold: attention threshold of the boxes, on maps min-max normalised to [0, 1] (0.1).
        ccrop_interval: recompute the boxes at the end of every ``ccrop_interval``-th epoch (0-based) after the
            warm-up (40 published; the paper says 20); guided crops from epoch ``max(interval, warm-up) + 1``.
        ccrop_warmup_epochs: no box update before this epoch; ``None``: ``warmup_epochs`` (the LR warm-up, 40).
        **kwargs: :class:`~ssl_modules.SSLModule` arguments. Defaults: AdamW, base lr 3e-4 per 256 images,
            absolute final lr 1e-3, 40 warm-up epochs, weight decay cosine 0.04 -> 0.4, gradient clipping
            0.3 (global norm). For ResNet-50: ``optimizer="lars"``, ``projector_activation="relu"``.

    Schedules (``docs/schedules.md``): the LR warm-up is numpy's ``linspace(0, peak, W)`` (official); the
    teacher is updated before its forward of iteration ``i`` with ``m[i]`` (official).
    """

    lr_warmup = "linspace"

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        num_global_crops: int = 2,
        num_target_crops: int | None = None,
        projector_widths: str = "4096-4096-4096",
        projector_norm: Literal["none", "batch"] = "none",
        projector_last_bn: bool = False,
        projector_activation: Literal["gelu", "relu"] = "gelu",
        teacher: bool = True,
        ema_momentum: float = 0.995,
        softmax_temperature: float = 0.1,
        sinkhorn_temperature: float = 0.05,
        sinkhorn_temperature_final: float | None = None,
        sinkhorn_warmup_epochs: int = 30,
        num_sinkhorn_iters: int = 3,
        positive_masking: bool = True,
        top_k: int = 128,
        mocov3_vit: bool = True,
        contrastive_crop: bool = False,
        ccrop_alpha: float = 0.6,
        ccrop_box_threshold: float = 0.1,
        ccrop_interval: int = 40,
        ccrop_warmup_epochs: float | None = None,
        lr: float = 3e-4,
        min_lr: float = 1e-3,
        warmup_epochs: float = 40.0,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = 0.4,
        clip_grad: float | None = 0.3,
        **kwargs: Any,
    ) -> None:
        if num_global_crops < 1 or (num_target_crops is not None and num_target_crops < 1):
            raise ValueError("num_global_crops and num_target_crops must be >= 1")
        check_ranges(type(self), [
            ("ema_momentum", ema_momentum, "in [0, 1]"), ("softmax_temperature", softmax_temperature, "> 0"),
            ("sinkhorn_temperature", sinkhorn_temperature, "> 0"),
            ("sinkhorn_temperature_final", sinkhorn_temperature_final, "> 0"),
            ("sinkhorn_warmup_epochs", sinkhorn_warmup_epochs, ">= 0"),
            ("num_sinkhorn_iters", num_sinkhorn_iters, ">= 0"),
            ("top_k", top_k, ">= 0"),
        ])
        for value in (sinkhorn_temperature, sinkhorn_temperature_final):
            if value is not None and value >= softmax_temperature:
                warnings.warn(
                    f"BAM: a Sinkhorn temperature ({value}) at or above the softmax temperature "
                    f"({softmax_temperature}) is the collapse regime the paper reports; keep it lower "
                    "(published: 0.05 vs 0.1)", stacklevel=2,
                )
        super().__init__(backbone=backbone, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
                         weight_decay=weight_decay, weight_decay_end=weight_decay_end, clip_grad=clip_grad, **kwargs)
        self.projector = MLP(
            self.backbone.num_features, projector_widths, norm=projector_norm, activation=projector_activation,
            last_norm="batch_nonaffine" if projector_last_bn else "none", init="trunc_normal",
        )
        if teacher:
            self.init_teacher(["backbone", "projector"], ema_momentum, update="before_forward")
        self._ccrop_settings: dict[str, float] | None = None
        if contrastive_crop:
            settings = {"alpha": ccrop_alpha, "box_threshold": ccrop_box_threshold, "interval": ccrop_interval,
                        "warmup_epochs": warmup_epochs if ccrop_warmup_epochs is None else ccrop_warmup_epochs}
            check_settings(**settings, prefix="ccrop_")
            check_attention_backbone(self.backbone)
            self._ccrop_settings = settings

    def configure_callbacks(self) -> list:
        """``super()``'s callbacks and, with ``contrastive_crop=True``, ``callbacks.ContrastiveCrop`` built from the
        ``ccrop_*`` arguments, unless the trainer already has one (the user's is kept as it is)."""
        callbacks = list(super().configure_callbacks() or [])
        if self._ccrop_settings is None:
            return callbacks
        # imported here: the callbacks package imports this one
        from ssl_modules.methods.contrastive_crop.callback import ContrastiveCrop

        given = self._trainer is not None and any(isinstance(c, ContrastiveCrop) for c in self.trainer.callbacks)
        if not given:
            callbacks.append(ContrastiveCrop(**self._ccrop_settings))
        return callbacks

    def build_backbone(self, name: str, kwargs: dict[str, Any]) -> Backbone:
        """MoCo v3 ViTs as the official BAM; its ViT-S has 12 heads (MoCo v3's ``vit_small``), not timm's 6."""
        mocov3 = self.hparams.mocov3_vit and is_vision_transformer_name(name)
        if mocov3 and name.split(".", 1)[0].startswith("vit_small_") and "embed_dim" not in kwargs:
            kwargs = {"num_heads": MOCOV3_VIT_SMALL_HEADS, **kwargs}
        return Backbone(name, mocov3_vit=mocov3, **kwargs)

    def on_fit_start(self) -> None:
        """``top_k`` against the target columns of the global batch, before the first forward pass."""
        super().on_fit_start()
        batch = getattr(self.trainer.datamodule, "batch_size", None)
        if not isinstance(batch, int) or self.hparams.top_k <= 0:
            return
        hp = self.hparams
        targets = hp.num_target_crops or hp.num_global_crops
        columns = targets * batch * self.trainer.world_size
        if hp.top_k > columns:
            raise ValueError(
                f"top_k ({hp.top_k}) exceeds the {columns} target columns ({targets} target crops x {batch} images "
                f"per process x {self.trainer.world_size} processes): lower top_k to at most {columns} or raise "
                "the batch size")

    # ----------------------------------------------------------------------------------- schedules
    def declare_schedules(self, plan: RunPlan) -> dict[str, Schedule]:
        """LR (numpy-linspace warm-up, cosine), WD and EMA momentum (cosines, per step; the teacher moves
        before its forward), and the Sinkhorn temperature per epoch: official
        ``linspace(sinkhorn_temperature, sinkhorn_temperature_final, sinkhorn_warmup_epochs)[epoch]``, then
        the final value (constant when no final value is given)."""
        hp = self.hparams
        schedules = super().declare_schedules(plan)
        start = hp.sinkhorn_temperature
        end = start if hp.sinkhorn_temperature_final is None else hp.sinkhorn_temperature_final
        ramp = hp.sinkhorn_warmup_epochs
        schedules["sinkhorn_temperature"] = lambda step: linspace_ramp(plan.epoch(step), start, end, ramp)
        return schedules

    def declare_warmups(self, plan: RunPlan) -> dict[str, int]:
        warmups = super().declare_warmups(plan)
        if self.hparams.sinkhorn_temperature_final is not None:
            description = f"sinkhorn_warmup_epochs={self.hparams.sinkhorn_warmup_epochs} (Sinkhorn-temperature ramp)"
            warmups[description] = plan.steps(self.hparams.sinkhorn_warmup_epochs)
        return warmups

    def sinkhorn_temperature(self) -> float:
        """The Sinkhorn temperature of the current step."""
        return self.scheduled("sinkhorn_temperature")

    # ---------------------------------------------------------------------------------------- step
    def project(self, backbone: Backbone, projector: MLP, crops: list[Tensor]) -> list[Tensor]:
        """Encode the crops (one call per resolution) and project all of them in one call."""
        return self.encode_and_project(backbone, projector, crops)[0]

    def encode_and_project(self, backbone: Backbone, projector: MLP,
                           crops: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """``project`` and the backbone's global feature of the first crop ``(B, C)``."""
        feats = encode_views(lambda x: self.encode(backbone, x), crops)
        return list(projector(torch.cat([f.global_ for f in feats])).chunk(len(crops))), feats[0].global_

    def training_step(self, views: Views, batch_idx: int) -> dict[str, Tensor]:
        if views.num_views < 2:
            raise ValueError(f"BAM needs at least 2 crops per image, got {views.num_views}")
        student, embedding = self.encode_and_project(self.backbone, self.projector, views.crops)
        teacher = None
        if self.has_teacher:
            with torch.no_grad():
                teacher, embedding = self.encode_and_project(self.teacher["backbone"], self.teacher["projector"],
                                                             views.crops)
        out = self.criterion(student, teacher)
        self.log_terms(
            {"loss": out["loss"], "attention_entropy": _row_entropy(out["attention"]),
             "target_entropy": _row_entropy(out["targets"]), "sinkhorn_temperature": self.sinkhorn_temperature()},
            sync_dist=distributed.world_size() > 1,
        )
        return {"loss": out["loss"], "embedding": embedding.detach()}

    def criterion(self, student: list[Tensor], teacher: list[Tensor] | None) -> dict[str, Tensor]:
        """This process's share of the BAM loss: own rows, columns and Sinkhorn over all processes."""
        hp = self.hparams
        return bam_loss(
            student, teacher,
            num_global_crops=hp.num_global_crops, num_target_crops=hp.num_target_crops,
            softmax_temperature=hp.softmax_temperature, sinkhorn_temperature=self.sinkhorn_temperature(),
            num_sinkhorn_iters=hp.num_sinkhorn_iters, positive_masking=hp.positive_masking, top_k=hp.top_k,
            gather=distributed.all_gather_with_grad, all_reduce=distributed.all_reduce,
            rank=distributed.rank(), world_size=distributed.world_size(),
        )

    # --------------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def visual_diagnostics(self, views: Views, max_images: int = 8) -> dict[str, Tensor]:
        """``bam/attention`` and ``bam/targets`` of the first images, as one process sees them: rows are the
        crops (crop-major: block ``v`` holds crop ``v`` of every image), columns the target crops; the
        positives (two crops of one image, removed from the loss) are marked. Does the source attention
        follow its balanced target, and is the target spread over the batch rather than collapsed?"""
        from ssl_modules.functional import bam_loss as full_batch_loss
        from ssl_modules.functional import bam_positive_mask
        from ssl_modules.drawing import attention_picture

        sub = views.select(slice(0, max_images))
        crops, count = sub.crops, sub.batch_size
        with self.evaluating():
            student = self.project(self.backbone, self.projector, crops)
            teacher = None
            if self.has_teacher:
                teacher = self.project(self.teacher["backbone"], self.teacher["projector"], crops)
        hp = self.hparams
        targets_crops = hp.num_target_crops or hp.num_global_crops
        top_k = min(hp.top_k, targets_crops * count)
        out = full_batch_loss(student, teacher,
                              num_global_crops=hp.num_global_crops, num_target_crops=hp.num_target_crops,
                              softmax_temperature=hp.softmax_temperature,
                              sinkhorn_temperature=self.sinkhorn_temperature(),
                              num_sinkhorn_iters=hp.num_sinkhorn_iters, positive_masking=hp.positive_masking,
                              top_k=top_k)
        positives = bam_positive_mask(count, len(crops), targets_crops)
        if not hp.positive_masking:
            positives = torch.zeros_like(positives)
        step = self.global_step
        return {
            "bam/attention": attention_picture(
                out["attention"], positives, count,
                f"BAM source attention at step {step}: softmax of each crop's similarity to the target crops"),
            "bam/targets": attention_picture(
                out["targets"], positives[: hp.num_global_crops * count], count,
                f"BAM balanced targets at step {step} (Sinkhorn, top-{top_k}): rows are the global crops"),
        }
