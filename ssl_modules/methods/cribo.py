"""CrIBo (Lebailly et al., ICLR 2024): cross-image object-level bootstrapping.

Per step: teacher forward of the two views -> joint-space clustering of the teacher's patch tokens of both
views (semantics + seed-image positions) into objects -> teacher and student objects pooled with the
teacher's clusters -> nearest neighbour of every teacher object in a memory bank of objects, kept when the
cycle back to the batch is consistent -> enqueue the batch's objects (all processes) -> three DINO-style
losses: global cross-view, object cross-view, object cross-image. Follows the official code
(``docs/cribo.md``). The step is shape-static and free of host synchronisation: objects stay padded
per image with a validity mask.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from ssl_modules.contracts import Views
from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Backbone, Features, is_vit_name
from ssl_modules.methods.base import SSLModule
from ssl_modules.functional import cribo_loss, joint_space_clustering, object_representations
from ssl_modules.networks.heads import DINOHead, NormalizedLinear
from ssl_modules.methods.memory_bank import ObjectMemoryBank, upgrade_flat_bank_keys
from ssl_modules.methods.sharded_bank import ShardedObjectMemoryBank
from ssl_modules.methods.local_matching import cell_locations
from ssl_modules.methods.multicrop import encode_views
from ssl_modules.methods.teacher import TeacherEMA
from ssl_modules.methods._ranges import check_ranges
from ssl_modules.optimization.schedules import RunPlan, Schedule, linspace_ramp

__all__ = ["CrIBo", "CrIBoHead"]


def _read_flat_bank(module: CrIBo, state_dict: dict[str, Tensor], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: a state dict holding the bank in the flat reference layout (``bank`` /
    ``bank_counts``, newest first, as ``ObjectMemoryBank.logical()`` gives it and as checkpoints of earlier
    versions of the library held it) loads into the ring buffer. A module-level function, not a closure, so
    that the module pickles."""
    upgrade_flat_bank_keys(state_dict, prefix, "memory_bank", module.memory_bank.normalized)


class CrIBoHead(DINOHead):
    """DINO head with a second prototype layer for objects; the MLP trunk is shared (official ``DINOHead``
    with ``last_layer`` for the CLS token and ``last_layer_c`` for objects)."""

    def __init__(self, in_dim: int, out_dim: int, object_out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__(in_dim, out_dim, hidden_dim, bottleneck_dim, 3, use_bn, norm_last_layer)
        self.last_layer_c = NormalizedLinear(bottleneck_dim, object_out_dim, norm_last_layer)

    def objects(self, x: Tensor) -> Tensor:
        return self.last_layer_c(self.bottleneck(x))


class CrIBo(TeacherEMA, SSLModule):
    """CrIBo as a LightningModule. Defaults are the released ViT-S/16 ImageNet recipe.

    Args:
        backbone: timm ViT name (``vit_small_patch16_224``, ``vit_base_patch16_224``).
        out_dim: prototypes of the global (CLS) head (65536).
        object_out_dim: prototypes of the object head (65536).
        head_hidden_dim: width of the shared head MLP (2048).
        head_bottleneck_dim: bottleneck of the heads (256).
        norm_last_layer: freeze the prototype norms (True for ViT-B, False for ViT-S).
        use_bn_in_head: BatchNorm in the head MLP.
        num_clusters: K, objects per image at most (32 ImageNet, 64 COCO).
        pos_weight: weight of the positional cost in the clustering (1.0 ImageNet, 2.0 COCO).
        cluster_iterations: clustering rounds (5).
        cluster_sinkhorn_iterations: Sinkhorn iterations per round (5).
        cluster_sinkhorn_lambda: inverse temperature of the clustering transport (20).
        update_marginals: carry the cluster sizes into the next round's marginal.
        queue_size: image slots of the memory bank (25000); the bank holds ``K`` object rows per slot.
        normalized_matching: l2-normalise the bank rows for the neighbour search.
        search_chunk_size: bank rows scored at once in the neighbour search.
        memory_bank_sharding: where the bank lives in a multi-process run. ``"sharded"``: each process keeps
            only the objects of its own images, about 1/world of the bank
            (:class:`~ssl_modules.methods.sharded_bank.ShardedObjectMemoryBank`; neighbours, cycle masks and
            losses are those of the replicated bank, ``docs/cribo.md``); ``"replicated"``: the whole bank on
            every process, as the official code; ``"auto"`` (default): sharded when ``fit`` runs in an
            initialised process group of more than one process (it gives the same results), replicated
            otherwise. The bank is sharded in ``setup`` (the world size is known only then); checkpoints hold
            the replicated layout in either case, so a run resumes at any world size and in either mode.
        ema_momentum: teacher momentum at the start (cosine to 1).
        teacher_temp: teacher temperature of the global head after warm-up (0.07).
        warmup_teacher_temp: ... at epoch 0 (0.04).
        object_teacher_temp: teacher temperature of the object head after warm-up (0.07).
        warmup_object_teacher_temp: ... at epoch 0 (0.04).
        warmup_teacher_temp_epochs: epochs of both ramps (30; 50 for ViT-B).
        student_temp: student temperature of the global loss (0.1).
        object_student_temp: student temperature of the object losses (0.1).
        center_momentum: momentum of both centers (0.9).
        freeze_last_layer_epochs: epochs during which both prototype layers get no update (1; 3 ViT-B).
        cross_image_start_epoch: first epoch of the cross-image loss (1: the bank starts random).
        local_group_size: images per clustering/cycle/loss group. The official code normalises the
            clustering cost, searches back in the cycle test and averages the losses per process; None
            keeps that (the group is the process's batch). One process with batch 2B and groups of B
            reproduces two processes with B each.
        **kwargs: :class:`~ssl_modules.SSLModule` arguments. Defaults: AdamW, base lr 5e-4 per 256 images,
            final lr 1e-5, 10 warm-up epochs, weight decay cosine 0.04 -> 0.4, no clipping (ViT-B: per-
            parameter clipping at 0.3), student drop path 0.1.

    Schedules (``docs/schedules.md``): the LR warm-up is numpy's ``linspace(0, peak, W)`` (official), and a
    run of at most 2 epochs has neither the LR nor the teacher-temperature warm-up (official).
    """

    lr_warmup = "linspace"

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        out_dim: int = 65536,
        object_out_dim: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        norm_last_layer: bool = False,
        use_bn_in_head: bool = False,
        num_clusters: int = 32,
        pos_weight: float = 1.0,
        cluster_iterations: int = 5,
        cluster_sinkhorn_iterations: int = 5,
        cluster_sinkhorn_lambda: float = 20.0,
        update_marginals: bool = True,
        queue_size: int = 25000,
        normalized_matching: bool = True,
        search_chunk_size: int = 65536,
        memory_bank_sharding: Literal["auto", "sharded", "replicated"] = "auto",
        ema_momentum: float = 0.996,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        object_teacher_temp: float = 0.07,
        warmup_object_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        object_student_temp: float = 0.1,
        center_momentum: float = 0.9,
        freeze_last_layer_epochs: int = 1,
        cross_image_start_epoch: int = 1,
        local_group_size: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 5e-4,
        min_lr: float = 1e-5,
        warmup_epochs: float = 10.0,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = 0.4,
        clip_grad: float | None = None,
        clip_grad_mode: Literal["global_norm", "per_parameter"] = "per_parameter",
        **kwargs: Any,
    ) -> None:
        if num_clusters < 1 or queue_size < 1:
            raise ValueError("num_clusters and queue_size must be >= 1")
        check_ranges(type(self), [
            ("ema_momentum", ema_momentum, "in [0, 1]"), ("teacher_temp", teacher_temp, "> 0"),
            ("warmup_teacher_temp", warmup_teacher_temp, "> 0"), ("object_teacher_temp", object_teacher_temp, "> 0"),
            ("warmup_object_teacher_temp", warmup_object_teacher_temp, "> 0"), ("student_temp", student_temp, "> 0"),
            ("object_student_temp", object_student_temp, "> 0"), ("center_momentum", center_momentum, "in [0, 1)"),
            ("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, ">= 0"),
            ("freeze_last_layer_epochs", freeze_last_layer_epochs, ">= 0"),
            ("cross_image_start_epoch", cross_image_start_epoch, ">= 0"), ("pos_weight", pos_weight, ">= 0"),
            ("cluster_iterations", cluster_iterations, ">= 1"),
            ("cluster_sinkhorn_iterations", cluster_sinkhorn_iterations, ">= 0"),
            ("cluster_sinkhorn_lambda", cluster_sinkhorn_lambda, "> 0"),
        ])
        if memory_bank_sharding not in ("auto", "sharded", "replicated"):
            raise ValueError(f"memory_bank_sharding must be 'auto', 'sharded' or 'replicated', got "
                             f"{memory_bank_sharding!r}")
        if local_group_size is not None and local_group_size < 1:
            raise ValueError(f"local_group_size must be >= 1 or None, got {local_group_size}")
        backbone_kwargs = {"drop_path_rate": 0.1, **(backbone_kwargs or {})}
        super().__init__(backbone=backbone, backbone_kwargs=backbone_kwargs, lr=lr, min_lr=min_lr,
                         warmup_epochs=warmup_epochs, weight_decay=weight_decay, weight_decay_end=weight_decay_end,
                         clip_grad=clip_grad, clip_grad_mode=clip_grad_mode, **kwargs)
        width = self.backbone.num_features
        self.head = CrIBoHead(width, out_dim, object_out_dim, head_hidden_dim, head_bottleneck_dim,
                              use_bn_in_head, norm_last_layer)
        self.init_teacher(["backbone", "head"], ema_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("object_center", torch.zeros(1, object_out_dim))
        # The official initial bank: uniform random rows, every slot "full" (K objects), identical on
        # every process (a fixed seed), pushed out by real objects one batch at a time.
        self.memory_bank = ObjectMemoryBank(queue_size, num_clusters, width, normalized_matching, seed=0)
        self.register_load_state_dict_pre_hook(_read_flat_bank)  # picklable: ddp_spawn, torch.save(module)

    def setup(self, stage: str) -> None:
        """Shard the memory bank for ``fit`` in a multi-process run (``memory_bank_sharding``). Runs before
        the strategy moves the module to its device and before a checkpoint is restored, so only the shard
        reaches the device and a checkpoint loads straight into it."""
        super().setup(stage)
        if stage == "fit" and self.shards_memory_bank() and isinstance(self.memory_bank, ObjectMemoryBank):
            self.memory_bank = ShardedObjectMemoryBank.from_replicated(self.memory_bank)
        elif isinstance(self.memory_bank, ObjectMemoryBank):
            # A replicated bank is updated identically on every process: DDP's broadcast of rank 0's buffers
            # before each forward (2.5 GB per step at the released ViT-S size) would only copy it onto itself.
            names = [f"memory_bank.{name}" for name, _ in self.memory_bank.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)

    def shards_memory_bank(self) -> bool:
        """Whether ``fit`` here keeps a sharded bank: a process group of more than one process, and
        ``memory_bank_sharding`` is not ``"replicated"``."""
        return self.hparams.memory_bank_sharding != "replicated" and distributed.is_distributed()

    def build_backbone(self, name: str, kwargs: dict[str, Any]) -> Backbone:
        """The official (DINO) ViT draws its CLS token from a truncated normal of std 0.02 (timm: 1e-6)."""
        if is_vit_name(name):
            kwargs = {"cls_token_init": "trunc_normal", **kwargs}
        return Backbone(name, **kwargs)

    # ----------------------------------------------------------------------------------- schedules
    def warmups_disabled(self, plan: RunPlan) -> bool:
        """Official: a run of at most 2 epochs has no LR and no teacher-temperature warm-up."""
        return plan.epochs <= 2

    def lr_warmup_steps(self, plan: RunPlan) -> int:
        return 0 if self.warmups_disabled(plan) else super().lr_warmup_steps(plan)

    def temperature_warmup_epochs(self, plan: RunPlan) -> int:
        """Epochs of the teacher-temperature ramps (0 for runs of at most 2 epochs)."""
        return 0 if self.warmups_disabled(plan) else self.hparams.warmup_teacher_temp_epochs

    def declare_schedules(self, plan: RunPlan) -> dict[str, Schedule]:
        """LR (numpy-linspace warm-up, cosine), WD and EMA momentum (cosines, per step); per epoch: both
        teacher temperatures (``linspace(warmup_temp, temp, W)[epoch]``, then ``temp``), the prototype
        layers' LR (0 during the first ``freeze_last_layer_epochs``, then ``lr``), the cross-image loss
        switch (1 from ``cross_image_start_epoch`` on)."""
        hp = self.hparams
        schedules = super().declare_schedules(plan)
        lr, ramp = schedules["lr"], self.temperature_warmup_epochs(plan)

        def temperature(start: float, end: float) -> Schedule:
            return lambda step: linspace_ramp(plan.epoch(step), start, end, ramp)

        schedules.update({
            "teacher_temp": temperature(hp.warmup_teacher_temp, hp.teacher_temp),
            "object_teacher_temp": temperature(hp.warmup_object_teacher_temp, hp.object_teacher_temp),
            "last_layer_lr": lambda step: 0.0 if plan.epoch(step) < hp.freeze_last_layer_epochs else lr(step),
            "cross_image": lambda step: float(plan.epoch(step) >= hp.cross_image_start_epoch),
        })
        return schedules

    def declare_warmups(self, plan: RunPlan) -> dict[str, int]:
        hp = self.hparams
        return {
            **super().declare_warmups(plan),
            f"warmup_teacher_temp_epochs={hp.warmup_teacher_temp_epochs} (teacher-temperature warm-up)":
                plan.steps(self.temperature_warmup_epochs(plan)),
            f"freeze_last_layer_epochs={hp.freeze_last_layer_epochs} (frozen prototype layers)":
                plan.steps(hp.freeze_last_layer_epochs),
            f"cross_image_start_epoch={hp.cross_image_start_epoch} (no cross-image loss before it)":
                plan.steps(hp.cross_image_start_epoch),
        }

    def temperatures(self) -> tuple[float, float]:
        """Teacher temperatures of the global and the object head at the current step."""
        return self.scheduled("teacher_temp"), self.scheduled("object_teacher_temp")

    def lr_schedule_groups(self) -> dict:
        """Both prototype layers (``last_layer``, ``last_layer_c``) follow ``last_layer_lr`` (as dinov2)."""
        return {"last_layer_lr": lambda name: name.startswith("head.") and "last_layer" in name}

    def on_after_backward(self) -> None:
        """During the freeze, drop the prototype layers' gradients right after backward, before a grad
        scaler unscales and checks them (official ``cancel_gradients_last_layer``): AdamW then skips
        them (no moment update, no decay) and fp16 overflow in them cannot make the scaler skip a step."""
        super().on_after_backward()
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for name, param in self.head.named_parameters():
                if "last_layer" in name:
                    param.grad = None

    # -------------------------------------------------------------------------------------- checks
    def group_size(self, batch: int) -> int:
        size = self.hparams.local_group_size or batch
        if batch % size:
            raise ValueError(f"local_group_size ({size}) must divide the per-process batch ({batch})")
        return size

    def _check_batch(self, views, feats: Features) -> None:
        if views.num_views < 2:
            raise ValueError(f"CrIBo needs 2 global views per image, got {views.num_views}")
        global_batch = views.batch_size * distributed.world_size()
        if self.hparams.queue_size < global_batch:
            raise ValueError(
                f"queue_size ({self.hparams.queue_size}) holds fewer images than one global batch "
                f"({global_batch}): raise queue_size to several batches (official: 25000)"
            )
        tokens = 2 * feats.dense.shape[1]
        if self.hparams.num_clusters > tokens:
            raise ValueError(
                f"num_clusters ({self.hparams.num_clusters}) exceeds the {tokens} patch tokens of the two "
                f"views ({feats.grid[0]}x{feats.grid[1]} patches each): lower num_clusters or use larger crops"
            )

    # ---------------------------------------------------------------------------------------- step
    def initial_centroids(self, views, tokens: int) -> Tensor:
        """K distinct random joint-token indices per image ``(B, K)``: the clustering's initial centroids."""
        scores = torch.rand(views.batch_size, tokens, device=views.crops[0].device)
        return scores.argsort(dim=1)[:, : self.hparams.num_clusters]

    def patch_positions(self, views, feats: list[Features]) -> list[Tensor]:
        """Seed-image pixel centre of every patch of the two global views (flips followed)."""
        return [cell_locations(views, v, feats[v].grid, flip_aware=True) for v in (0, 1)]

    def cluster(self, views: Views, teacher_feats: list[Features]) -> Tensor:
        """Joint-space clustering of the teacher's patch tokens of both views -> labels ``(2, B, N)``."""
        hp = self.hparams
        dense = [f.dense for f in teacher_feats[:2]]
        return joint_space_clustering(
            dense, self.patch_positions(views, teacher_feats), self.initial_centroids(views, 2 * dense[0].shape[1]),
            pos_weight=hp.pos_weight, num_iterations=hp.cluster_iterations,
            sinkhorn_iterations=hp.cluster_sinkhorn_iterations, sinkhorn_lambda=hp.cluster_sinkhorn_lambda,
            update_marginals=hp.update_marginals, groups=views.batch_size // self.group_size(views.batch_size),
        )["labels"]

    def retrieve(self, teacher_objects: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """Nearest bank object of every teacher object, with the cycle test (the bank before this step's
        update). ``teacher_objects (2, B, K, D)``, ``valid (B, K)``."""
        batch, clusters = valid.shape
        group = torch.arange(batch, device=valid.device) // self.group_size(batch)
        return self.memory_bank.search(
            teacher_objects.reshape(2, batch * clusters, -1), query_valid=valid.reshape(-1),
            query_groups=group.repeat_interleave(clusters), chunk_size=self.hparams.search_chunk_size,
        )

    @torch.no_grad()
    def enqueue(self, teacher_objects: Tensor, valid: Tensor) -> None:
        """Push the objects of every process's batch (rank order) into the banks: a sharded bank keeps this
        process's images (and gathers only their counts), a replicated one gathers every process's objects."""
        if isinstance(self.memory_bank, ShardedObjectMemoryBank):
            self.memory_bank.enqueue_local_(teacher_objects, valid)
            return
        objects = distributed.all_gather_no_grad(teacher_objects.transpose(0, 1).contiguous()).transpose(0, 1)
        self.memory_bank.enqueue_(objects, distributed.all_gather_no_grad(valid))

    @staticmethod
    def project_globals(head: CrIBoHead, feats: list[Features]) -> list[Tensor]:
        """The global head on every view's CLS token in one call (the official DINO-style head call)."""
        return list(head(torch.cat([f.global_ for f in feats])).chunk(len(feats)))

    def training_step(self, views: Views, batch_idx: int) -> dict[str, Tensor]:
        hp = self.hparams
        batch, clusters = views.batch_size, hp.num_clusters
        with torch.no_grad():
            teacher_feats = encode_views(lambda x: self.encode(self.teacher["backbone"], x), views.crops[:2])
            self._check_batch(views, teacher_feats[0])
            teacher_global = self.project_globals(self.teacher["head"], teacher_feats)
            labels = self.cluster(views, teacher_feats)
            teacher = object_representations([f.dense for f in teacher_feats], labels, clusters)  # float32
            valid = teacher["valid"]
            neighbours = self.retrieve(teacher["objects"], valid)
            self.enqueue(teacher["objects"], valid)
            teacher_objects = self.teacher["head"].objects(teacher["objects"].reshape(2, batch * clusters, -1))
            neighbour_objects = self.teacher["head"].objects(neighbours["neighbours"])

        student_feats = encode_views(self.forward, views.crops)
        student_global = self.project_globals(self.head, student_feats)
        student = object_representations([f.dense for f in student_feats[:2]], labels, clusters)["objects"]
        student_objects = self.head.objects(student.reshape(2, batch * clusters, -1))

        out = self.criterion(student_global, teacher_global, student_objects, teacher_objects, neighbour_objects,
                             neighbours["mask"], valid)
        self.update_centers(teacher_global, teacher_objects, valid)
        self.log_terms({
            **out,
            "objects_per_image": valid.sum(1).float().mean(),
            "cycle_consistent_ratio": neighbours["mask"][0].sum() / valid.sum().clamp(min=1),
        }, sync_dist=distributed.world_size() > 1)
        return {"loss": out["loss"], "embedding": teacher_feats[0].global_.detach()}

    def criterion(self, student_global, teacher_global, student_objects, teacher_objects, neighbour_objects,
                  cycle_mask, valid) -> dict[str, Tensor]:
        """The three losses, averaged over the local groups (one group per process by default)."""
        hp = self.hparams
        temp, object_temp = self.temperatures()
        batch, clusters = valid.shape
        size = self.group_size(batch)
        cross_image = self.scheduled("cross_image") > 0
        terms = []
        for start in range(0, batch, size):
            images, rows = slice(start, start + size), slice(start * clusters, (start + size) * clusters)
            terms.append(cribo_loss(
                student_global=[s[images] for s in student_global],
                teacher_global=[t[images] for t in teacher_global],
                student_objects=[s[rows] for s in student_objects],
                teacher_objects=[t[rows] for t in teacher_objects],
                neighbour_objects=[n[rows] for n in neighbour_objects],
                cycle_mask=cycle_mask[:, rows], center=self.center, object_center=self.object_center,
                teacher_temp=temp, object_teacher_temp=object_temp, student_temp=hp.student_temp,
                object_student_temp=hp.object_student_temp,
                cross_image=cross_image, object_valid=valid.reshape(-1)[rows],
            ))
        if len(terms) == 1:
            return terms[0]
        return {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}

    @torch.no_grad()
    def update_centers(self, teacher_global: list[Tensor], teacher_objects: Tensor, valid: Tensor) -> None:
        """EMA of the teacher logits' global means (sums and counts all-reduced over processes)."""
        momentum, width = self.hparams.center_momentum, self.center.shape[1]
        logits = torch.cat(teacher_global).to(self.center.dtype)
        weights = valid.reshape(1, -1, 1).to(self.center.dtype)
        sums = torch.cat([  # one collective for both sums and the object count
            logits.sum(0), (teacher_objects.to(weights.dtype) * weights).sum(dim=(0, 1)), 2 * weights.sum()[None],
        ])
        sums = distributed.all_reduce(sums, "sum")
        count = logits.shape[0] * distributed.world_size()
        self.center.mul_(momentum).add_(sums[None, :width] / count, alpha=1 - momentum)
        object_count = sums[-1].clamp(min=1)
        self.object_center.mul_(momentum).add_(sums[None, width:-1] / object_count, alpha=1 - momentum)

    # --------------------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def visual_diagnostics(self, views: Views, max_images: int = 4) -> dict[str, Tensor]:
        """``cribo/object_clusters``: for the first images, each global crop beside the teacher's clusters
        of it (the clustering of both views together, as in training): are the objects found, and are they
        the same in both views?"""
        from ssl_modules.drawing import cluster_rows, denormalize

        count = min(max_images, views.batch_size)
        sub = views.select(slice(0, count), views=slice(0, 2))
        with self.evaluating():
            feats = encode_views(lambda x: self.encode(self.teacher["backbone"], x), sub.crops)
        old_group = self.hparams.local_group_size
        self.hparams.local_group_size = None
        try:
            labels = self.cluster(sub, feats)
        finally:
            self.hparams.local_group_size = old_group
        grids = [feats[v].grid for v in (0, 1)]
        maps = torch.stack([labels[v].reshape(count, *grids[v]) for v in (0, 1)])
        shared = sum(len(set(maps[0, i].unique().tolist()) & set(maps[1, i].unique().tolist()))
                     for i in range(count))
        caption = [f"CrIBo teacher clusters at step {self.global_step}: one image per row, K = "
                   f"{self.hparams.num_clusters} clusters of both views together",
                   f"same colour = same cluster in both views; white = cluster boundary; {shared / count:.1f} "
                   "clusters per image appear in both views"]
        crops = [denormalize(crop) for crop in sub.crops]
        return {"cribo/object_clusters": cluster_rows(crops, maps, self.hparams.num_clusters, caption)}
