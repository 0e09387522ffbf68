"""``SSLModule``: what every method shares — backbone, optimizer, closed-form schedules, ``embed`` for probes."""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import Tensor, nn

from ssl_modules.run import distributed
from ssl_modules.networks.backbones import Backbone, Features
from ssl_modules.optimization.optimizers import OPTIMIZERS, build_optimizer, parameter_groups
from ssl_modules.methods._ranges import check_ranges
from ssl_modules.optimization.schedules import RunPlan, Schedule, WarmupFormula, cosine, warmup_cosine

__all__ = ["SSLModule"]

_UNBOUNDED_STEPS = 2**62  # the nominal length of a run outside fit: schedules stay at their start values
# The module normalises uint8 crops in its own on_after_batch_transfer by design (interface of the DataModules):
# Lightning's note that it uses the module's hook and not the DataModule's says nothing a user must act on.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule` but "
                        r"have passed in a `LightningDataModule`")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    Class attribute ``lr_warmup`` is the method's warm-up formula (``"fraction"``: ``peak * i / W``;
    ``"linspace"``: ``peak * i / (W - 1)``, numpy's linspace as DINO-family code uses), see
    ``docs/schedules.md``.
        mean, std: per-channel normalisation of uint8 crops, ``(x / 255 - mean) / std`` on the training
            device (ImageNet's by default); float crops are taken as already normalised.
        nonfinite_guard: stop training at the first NaN/Inf loss term and never checkpoint or export
            non-finite weights (``ssl_modules.run.guard``; ``docs/failures.md``). ``False`` turns it off.
        backbone_weights: the weights a new run starts from (``docs/posttraining.md``): ``"timm"`` (timm's
            pretrained weights of ``backbone``), ``"timm:<pretrained name>"``, or a local file or folder (a
            ``.safetensors``, a timm folder, an export, an official checkpoint, a checkpoint of this library).
            The student is loaded before the teacher is copied from it, so both start from these weights; heads
            start from scratch. Not a resume: ``--ckpt_path`` resumes a run (``ssl_modules.networks.initialization``).
        trust_backbone_weights: read ``backbone_weights`` with full unpickling (the trust rule of
            ``ssl_modules.checkpoints.reading``: only for a file from a source you trust).
        layer_decay: layer-wise learning-rate decay (BEiT, DINOv2 fine-tuning): the backbone's layer ``l`` of
            ``L`` (timm's grouping: 0 the stem, then one per block, the final norm with the last block) trains
            at ``lr * layer_decay ** (L - l)``, the heads at ``lr``. ``None`` (or 1) turns it off.
        freeze_blocks: freeze the stem and the first ``freeze_blocks`` blocks of the student (no gradient, not
            in the optimizer; a teacher keeps them equal). ``0`` trains everything.
    """

    lr_warmup: ClassVar[WarmupFormula] = "fraction"

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
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        nonfinite_guard: bool = True,
        backbone_weights: str | None = None,
        trust_backbone_weights: bool = False,
        layer_decay: float | None = None,
        freeze_blocks: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        check_ranges(type(self), [
            ("lr", lr, "> 0"), ("min_lr", min_lr, ">= 0"), ("min_lr_ratio", min_lr_ratio, "in [0, 1]"),
            ("warmup_epochs", warmup_epochs, ">= 0"), ("weight_decay", weight_decay, ">= 0"),
            ("weight_decay_end", weight_decay_end, ">= 0"), ("momentum", momentum, "in [0, 1)"),
            ("betas", betas, "in [0, 1)"), ("lars_eta", lars_eta, "> 0"), ("clip_grad", clip_grad, ">= 0"),
            ("layer_decay", layer_decay, "in (0, 1]"), ("freeze_blocks", freeze_blocks, ">= 0"),
        ])
        if clip_grad_mode not in ("global_norm", "per_parameter"):
            raise ValueError(f"clip_grad_mode must be 'global_norm' or 'per_parameter', got {clip_grad_mode!r}")
        self.backbone = self.build_backbone(backbone, dict(backbone_kwargs or {}))
        self.backbone_source: dict[str, Any] | None = None  # where the starting weights came from
        if backbone_weights is not None:
            from ssl_modules.networks.initialization import initialise_backbone

            self.backbone_source = initialise_backbone(self.backbone, backbone_weights,
                                                       trust_backbone_weights).as_record()
        if freeze_blocks:
            freeze_first_layers(self.backbone, freeze_blocks)
        self.channels_last = channels_last and not self.backbone.is_vit
        self._schedules: dict[str, Schedule] | None = None  # declared at the first training batch of a fit
        self._schedule_values: dict[str, float] = {}  # the values applied to the current step
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values each (RGB) with std > 0, got mean={mean}, std={std}")
        self.logged_terms: tuple[int, dict[str, Tensor | float]] | None = None

    def configure_callbacks(self) -> list[pl.Callback]:
        """``ExactResume`` (RNG states per rank in checkpoints, mid-epoch checkpoints on graceful stops,
        ``docs/resume.md``), ``EpochEndReductions`` (epoch values reduced in the same order on every process,
        ``docs/failures.md``) and the non-finite guard (unless ``nonfinite_guard=False``, ``docs/failures.md``);
        subclasses extend ``super()``'s list."""
        from ssl_modules.run.collective_order import EpochEndReductions
        from ssl_modules.run.resume import ExactResume

        callbacks = [*(super().configure_callbacks() or []), ExactResume(), EpochEndReductions()]
        if self.hparams.get("nonfinite_guard", True):
            from ssl_modules.run.guard import NonFiniteGuard

            given = self._trainer is not None and any(isinstance(c, NonFiniteGuard) for c in self.trainer.callbacks)
            if not given:  # a guard the user configured (e.g. another check interval) is kept as it is
                callbacks.append(NonFiniteGuard())
        return callbacks

    # ------------------------------------------------------------------------------------------ input
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 crops of a training batch to float ``(x / 255 - mean) / std``, on the training device."""
        crops = getattr(batch, "crops", None)
        if isinstance(crops, list) and hasattr(batch, "_replace"):
            return batch._replace(crops=[self.normalize_crop(c) for c in crops])
        return batch

    def normalize_crop(self, crop: Tensor) -> Tensor:
        """A uint8 crop normalised with the module's mean/std; float crops unchanged; other dtypes refused."""
        if crop.is_floating_point():
            return crop
        if crop.dtype != torch.uint8:
            raise TypeError(
                f"crops reached the module as {crop.dtype}: pass uint8 images in [0, 255] (normalised here with "
                f"mean={tuple(self.hparams.mean)}, std={tuple(self.hparams.std)}) or already normalised float "
                "tensors, e.g. crops.to(torch.uint8) or (crops / 255 - mean) / std")
        mean = torch.tensor(self.hparams.mean, device=crop.device, dtype=torch.float32).view(-1, 1, 1) * 255.0
        std = torch.tensor(self.hparams.std, device=crop.device, dtype=torch.float32).view(-1, 1, 1) * 255.0
        return crop.float().sub_(mean).div_(std)

    # ----------------------------------------------------------------------------------------- parts
    def build_backbone(self, name: str, kwargs: dict[str, Any]) -> Backbone:
        """The student backbone; methods override to pass method-specific options."""
        return Backbone(name, **kwargs)

    @property
    def embedding_backbone(self) -> Backbone:
        """The backbone whose features probes and exports use: the student's here; a method with a teacher
        (:class:`~ssl_modules.methods.teacher.TeacherEMA`) gives the teacher's."""
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

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): shard the student backbone (per block or stage,
        then whole), the heads and the EMA teacher's copies over the data-parallel mesh
        (``ssl_modules.run.sharding``, ``docs/fsdp2.md``). Under any other strategy (no device mesh): nothing.
        Called again by a later ``validate``/``fit`` of the same module: parts already sharded stay as they are."""
        mesh = self._device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule

        from ssl_modules.run import sharding

        if any(isinstance(module, FSDPModule) for module in self.modules()):
            return
        sharding.shard_parts(self, sharding.data_parallel_mesh(mesh))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing: representation quality is measured by the probe callbacks, which run at the end of
        the validation epoch of ``trainer.validate`` (and ``python -m ssl_modules validate``)."""
        return None

    validation_step.consumes_batches = False  # fit then loads no validation batch (datamodules/base.py)

    # ------------------------------------------------------------------------------------ schedules
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: Lightning's estimate, ``min(max_steps, max_epochs * steps_per_epoch)``."""
        estimate = self.trainer.estimated_stepping_batches
        if math.isinf(estimate):
            raise ValueError("the schedules need a run of known length: set Trainer(max_epochs=...) or max_steps")
        return max(int(estimate), 1)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, from the real number of training batches per epoch
        (``ceil(num_training_batches / accumulate_grad_batches)``, as Lightning steps), whether or not
        ``max_steps`` binds. For a loader without a length: ``total_steps / max_epochs``."""
        batches = self.trainer.num_training_batches
        if math.isinf(batches):
            epochs = self.trainer.max_epochs
            return max(self.total_steps // epochs if epochs and epochs > 0 else self.total_steps, 1)
        return max(math.ceil(batches / max(self.trainer.accumulate_grad_batches, 1)), 1)

    def global_batch_size(self, batch: Any) -> int:
        """Images per optimizer step over all processes."""
        return _batch_size(batch) * distributed.world_size() * self.trainer.accumulate_grad_batches

    def run_plan(self, batch: Any = None) -> RunPlan:
        """The run's length (and, given a training batch, its global batch size) for the schedules.

        Outside ``fit`` (no trainer, or a trainer that has not set up its training data) the plan is
        nominal: one step per epoch, ``max_epochs`` steps (unbounded without a trainer), batch 256, so that
        every schedule gives its start value at step 0.
        """
        batch_size = 256 if batch is None else self.global_batch_size(batch)
        if self._trainer is None:
            return RunPlan(_UNBOUNDED_STEPS, 1, batch_size)
        if math.isinf(self.trainer.num_training_batches):
            epochs, steps = self.trainer.max_epochs, self.trainer.max_steps
            total = epochs if epochs and epochs > 0 else (steps if steps and steps > 0 else _UNBOUNDED_STEPS)
            return RunPlan(total, 1, batch_size)
        return RunPlan(self.total_steps, self.steps_per_epoch, batch_size)

    def lr_warmup_steps(self, plan: RunPlan) -> int:
        """Optimizer steps of the learning-rate warm-up (``warmup_epochs`` converted with the real epoch)."""
        return plan.steps(self.hparams.warmup_epochs)

    def peak_lr(self, plan: RunPlan) -> float:
        """``lr * global_batch / 256`` with linear scaling, else ``lr``."""
        hp = self.hparams
        return hp.lr * (plan.global_batch_size / 256 if hp.lr_scaling == "linear" else 1.0)

    def declare_schedules(self, plan: RunPlan) -> dict[str, Schedule]:
        """Every schedule of the method, ``name -> (optimizer step -> value)``, built once per fit.

        The base declares ``lr`` (linear warm-up from 0 with the method's ``lr_warmup`` formula, then a
        half-cosine to the final LR) and ``weight_decay`` (half-cosine from ``weight_decay`` to
        ``weight_decay_end``, or constant). Methods extend the dict (``super().declare_schedules(plan)``);
        :meth:`on_train_batch_start` applies the learning rates and weight decay to the optimizer groups
        (each group's ``lr_schedule`` names its LR schedule), logs every value as ``schedule/<name>``, and
        :meth:`scheduled` gives the current value to the training step.
        """
        hp = self.hparams
        peak, total, warmup = self.peak_lr(plan), plan.total_steps, self.lr_warmup_steps(plan)
        final = peak * hp.min_lr_ratio if hp.min_lr_ratio is not None else hp.min_lr
        wd_start = hp.weight_decay
        wd_end = wd_start if hp.weight_decay_end is None else hp.weight_decay_end
        formula = self.lr_warmup
        return {
            "lr": lambda step: warmup_cosine(step, total, warmup, peak, final, formula=formula),
            "weight_decay": lambda step: cosine(step, total, wd_start, wd_end),
        }

    def declare_warmups(self, plan: RunPlan) -> dict[str, int]:
        """Warm-ups and delays of the method in optimizer steps, ``description -> steps``: a warning at the
        start of fit names each one that is longer than the run."""
        return {f"warmup_epochs={self.hparams.warmup_epochs:g} (learning-rate warm-up)": self.lr_warmup_steps(plan)}

    def scheduled(self, name: str) -> float:
        """The value of schedule ``name`` at the current optimizer step.

        During fit, the value :meth:`on_train_batch_start` applied to this step; outside fit, the schedule
        evaluated on :meth:`run_plan` at the trainer's step (0 without a trainer).
        """
        if name in self._schedule_values:
            return self._schedule_values[name]
        schedules = self._schedules if self._schedules is not None else self.declare_schedules(self.run_plan())
        if name not in schedules:
            raise KeyError(f"{type(self).__name__} declares no schedule {name!r}; it has {sorted(schedules)}")
        return schedules[name](self.trainer.global_step if self._trainer is not None else 0)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the declared schedules (closures over the run plan, declared again at the next
        training batch), so that a trained module pickles (``torch.save(module)``, ``ddp_spawn``)."""
        state = super().__getstate__()
        state["_schedules"] = None
        return state

    def on_train_start(self) -> None:
        super().on_train_start()
        self._schedules, self._schedule_values = None, {}
        plan = self.run_plan()
        for description, steps in self.declare_warmups(plan).items():
            if steps > plan.total_steps:
                rank_zero_warn(
                    f"{type(self).__name__}: {description} lasts {steps} optimizer steps, longer than the run "
                    f"({plan.total_steps} steps = {plan.total_steps / plan.steps_per_epoch:g} epochs of "
                    f"{plan.steps_per_epoch} steps): it never completes. Shorten it or train longer")
        if self.backbone_source is not None and not self.trainer.ckpt_path:
            source = self.backbone_source
            rank_zero_info(f"{type(self).__name__}: a new run from {source['kind']} weights {source['location']}"
                           + (f" (sha256 {source['sha256'][:12]})" if source.get("sha256") else "")
                           + "; student and teacher start from them, the heads from scratch")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The one schedule hook: evaluate every declared schedule at the optimizer step, apply the learning
        rates and the weight decay to the optimizer groups, and log every value as ``schedule/<name>``."""
        super().on_train_batch_start(batch, batch_idx)
        if self._schedules is None:
            plan = self.run_plan(batch)
            self._schedules = self.declare_schedules(plan)
            self._warn_if_final_lr_above_peak(plan)
        step = self.trainer.global_step
        self._schedule_values = {name: float(schedule(step)) for name, schedule in self._schedules.items()}
        self.apply_schedules(self._schedule_values)
        self.log_dict({f"schedule/{k}": v for k, v in self._schedule_values.items()}, on_step=True, on_epoch=False)

    def apply_schedules(self, values: Mapping[str, float]) -> None:
        """Each optimizer group's LR from the schedule its ``lr_schedule`` names (``"lr"`` when it has none);
        the decayed groups' weight decay from ``weight_decay``."""
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = values[group.get("lr_schedule", "lr")] * group.get("lr_scale", 1.0)
                if group.get("decayed", False):
                    group["weight_decay"] = values["weight_decay"]

    def _warn_if_final_lr_above_peak(self, plan: RunPlan) -> None:
        hp = self.hparams
        peak = self.peak_lr(plan)
        final = peak * hp.min_lr_ratio if hp.min_lr_ratio is not None else hp.min_lr
        if final > peak:
            rank_zero_warn(  # on one process: every process computes the same schedule
                f"min_lr ({final:g}) is above the peak learning rate ({peak:g} = lr x global batch / 256): the "
                "'decay' raises the learning rate. Lower min_lr (it is absolute) or use min_lr_ratio")

    # ------------------------------------------------------------------------------------ optimizer
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters (a teacher is frozen, probes have their own optimizers)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def lr_schedule_groups(self) -> dict[str, Callable[[str], bool]]:
        """Parameters whose learning rate follows a schedule of their own: ``schedule name -> accepts(name)``
        (CrIBo's prototype layers follow ``last_layer_lr``); the others follow ``lr``."""
        return {}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factor per parameter name (layer-wise decay of the student backbone; see ``layer_decay``).
        Parameters not named train at the scheduled learning rate."""
        decay = self.hparams.get("layer_decay")
        if decay is None or decay == 1:
            return {}
        layers, count = self.backbone.layer_ids()
        prefix = next(name for name, module in self.named_modules() if module is self.backbone)
        return {f"{prefix}.{name}": decay ** (count - layer) for name, layer in layers.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups = parameter_groups(self.trainable_named_parameters(), hp.weight_decay, self.lr_schedule_groups(),
                                  self.lr_scales())
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
        if self._trainer is not None and self.training:  # read by the non-finite guard (ssl_modules.run.guard)
            self.logged_terms = (self.trainer.global_step, values)
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
        super().on_save_checkpoint(checkpoint)
        from ssl_modules.checkpoints.reading import class_path

        checkpoint["ssl_module_class"] = class_path(type(self))
        checkpoint["ssl_module_backbone_source"] = self.backbone_source  # where the run's weights started
        backbone = self.embedding_backbone
        prefix = next(name for name, module in self.named_modules() if module is backbone)
        # What an export needs without importing the (maybe user-defined) class: see ``export_from_checkpoint``.
        checkpoint["ssl_module_backbone"] = {
            "name": backbone.name, "model_kwargs": dict(backbone.model_kwargs),
            "state_prefix": f"{prefix}.model." if prefix else "model.",
            "removed_layer_scale": dict(getattr(backbone, "_removed_layer_scale", {})),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A resume (``--ckpt_path``) must continue the run the module's ``backbone_weights`` describe."""
        super().on_load_checkpoint(checkpoint)
        if self._trainer is not None and self.trainer.ckpt_path and "ssl_module_backbone_source" in checkpoint:
            from ssl_modules.networks.initialization import check_resume_matches_start

            check_resume_matches_start(str(self.trainer.ckpt_path), checkpoint["ssl_module_backbone_source"],
                                       self.backbone_source)

    @staticmethod
    def load_any(path: str | Path, map_location: str | torch.device = "cpu", *,
                 trust_checkpoint: bool = False) -> SSLModule:
        """Load a checkpoint of any ``SSLModule`` subclass (the class is recorded in the checkpoint), read
        under the trust rule of ``ssl_modules.checkpoints.reading`` (``checkpoint_io.load_module``)."""
        from ssl_modules.checkpoints.reading import load_module

        return load_module(path, map_location, trust_checkpoint=trust_checkpoint)

    # --------------------------------------------------------------------------------------- export
    def export_backbone(self, path: str | Path) -> Path:
        """Write the (teacher's, where there is one) backbone weights for timm; returns ``path``.

        A ``.pt`` path gets a plain state dict that
        ``timm.create_model(name, num_classes=0, **model_kwargs).load_state_dict(sd)`` loads strictly, and
        ``path.with_suffix(".json")`` records ``name`` and ``model_kwargs``; a folder gets ``config.json`` and
        ``model.safetensors``, which ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads by itself
        (``ssl_modules.checkpoints.export``, the one writer). Non-finite weights are refused before anything is
        written.
        """
        from ssl_modules.checkpoints.export import export_backbone

        return export_backbone(self.embedding_backbone, path, self.hparams.get("mean", IMAGENET_MEAN),
                               self.hparams.get("std", IMAGENET_STD))


def freeze_first_layers(backbone: Backbone, count: int) -> None:
    """``requires_grad=False`` for the stem and the first ``count`` blocks of ``backbone`` (timm's grouping,
    :meth:`~ssl_modules.networks.backbones.Backbone.layer_ids`)."""
    layers, total = backbone.layer_ids()
    if count > total - 1:
        raise ValueError(f"freeze_blocks={count}: {backbone.name} has {total - 1} blocks after its stem; "
                         f"freeze at most {total - 1} (the whole backbone)")
    for name, param in backbone.named_parameters():
        if layers.get(name, total) <= count:
            param.requires_grad_(False)


@torch.no_grad()
def clip_per_parameter_(params: list[Tensor], clip: float) -> None:
    """Rescale every gradient whose own l2 norm exceeds ``clip`` to norm ``clip`` (DINO's rule)."""
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)
