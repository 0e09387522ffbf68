"""A method's full training step against the bare backbone's own work on the same crops.

    python benchmarks/step_overhead.py --method vicregl --preset tiny
    python benchmarks/step_overhead.py --method bam --preset paper --device cuda --precision bf16-mixed

The method's step is timed inside a real ``Trainer`` (forward, losses, backward, optimizer step, EMA
update, Lightning's own overhead). The baseline is what any method must do at least: the student
backbone's forward and backward on the same crops (one call per resolution group, as the method sees
them) plus, for methods with an EMA teacher, the teacher backbone's forward. The ratio method / baseline
is the price of the method on top of its backbone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_modules.methods.base import SSLModule  # noqa: E402
from ssl_modules.methods.multicrop import resolution_groups  # noqa: E402
from ssl_modules.run.performance import compile_backbones, set_grad_checkpointing  # noqa: E402
from ssl_modules.testing import random_views  # noqa: E402

TINY_VIT = dict(img_size=32, patch_size=8, depth=2)

# method name -> preset name -> factory returning (module, crop sizes, per-process batch size).
# Each method registers its presets in `register_presets` below.
PRESETS: dict[str, dict[str, Callable[[], tuple[SSLModule, list[int], int]]]] = {}


def register_presets() -> None:
    """Import the methods that exist and record their tiny (CPU) and paper (GPU) settings."""
    try:
        from ssl_modules.methods.vicregl import VICRegL  # noqa: F401
    except ImportError:
        pass
    else:
        PRESETS["vicregl"] = {
            "tiny": lambda: (VICRegL("convnext_atto", num_matches=(4, 2), expander_widths="256-256-256",
                                     projector_widths="128-128-128"), [96, 96, 64, 64], 16),
            "paper": lambda: (VICRegL("resnet50", alpha=0.75), [224, 224], 64),
        }
    try:
        from ssl_modules.methods.bam import BAM  # noqa: F401
    except ImportError:
        pass
    else:
        PRESETS["bam"] = {
            "tiny": lambda: (BAM("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, projector_widths=[256, 256, 256],
                                 top_k=16), [32, 32, 16, 16], 16),
            "paper": lambda: (BAM("vit_small_patch16_224"), [224, 224] + [96] * 6, 64),
        }
    try:
        from ssl_modules.methods.cribo import CrIBo  # noqa: F401
    except ImportError:
        pass
    else:
        PRESETS["cribo"] = {
            "tiny": lambda: (CrIBo("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, out_dim=1024, head_hidden_dim=256,
                                   head_bottleneck_dim=64,
                                   object_out_dim=1024, num_clusters=4, queue_size=256), [32, 32], 16),
            "paper": lambda: (CrIBo("vit_small_patch16_224"), [224, 224], 64),
        }


class StepTimer(pl.Callback):
    """Wall time of every training batch, from its start to the end of its optimizer step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def time_method(module: SSLModule, views, steps: int, warmup: int, device: torch.device, precision: str,
                callbacks: list[pl.Callback] | None = None) -> float:
    """Median seconds of a full training step of ``module`` inside a Trainer (``callbacks`` run too)."""
    loader = DataLoader(range(steps + warmup), batch_size=None, collate_fn=lambda _: views)
    timer = StepTimer(device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, max_epochs=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer, *(callbacks or [])],
    )
    trainer.fit(module, loader)
    return statistics.median(timer.times[warmup:])


def time_backbone(module: SSLModule, views, steps: int, warmup: int, device: torch.device, precision: str) -> float:
    """Median seconds of the student backbone's forward + backward (+ the teacher's forward) on the crops."""
    module = module.to(device).train()
    crops = [c.to(device) for c in views.crops]
    groups = [torch.cat([crops[i] for i in g]) for g in resolution_groups(crops)]
    teacher = getattr(module, "teacher", None)
    teacher_backbone = teacher["backbone"] if teacher is not None and "backbone" in teacher else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in precision else nullcontext()
    times = []
    for i in range(steps + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = sum(f.global_.float().mean() + f.dense.float().mean() for f in map(module.forward, groups))
            if teacher_backbone is not None:
                with torch.no_grad():
                    for g in groups:
                        module.encode(teacher_backbone, g)
        loss.backward()
        module.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    register_presets()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(PRESETS) or None, required=True)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="per-process batch (default: the preset's)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on GPUs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-backbone", action="store_true", help="torch.compile the backbones first")
    parser.add_argument("--grad-checkpointing", action="store_true", help="timm activation checkpointing")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module, sizes, batch = PRESETS[args.method][args.preset]()
    if args.grad_checkpointing:
        set_grad_checkpointing(module)
    if args.compile_backbone:
        compile_backbones(module)
    views = random_views(args.batch_size or batch, sizes)
    base = time_backbone(module, views, args.steps, args.warmup, device, args.precision)
    full = time_method(module, views, args.steps, args.warmup, device, args.precision)
    print(f"method={args.method} preset={args.preset} device={device} precision={args.precision} "
          f"batch={args.batch_size or batch} crops={sizes}")
    print(f"bare backbone fwd+bwd{' + teacher fwd' if hasattr(module, 'teacher') else ''}: {base * 1e3:.1f} ms/step")
    print(f"full training step: {full * 1e3:.1f} ms/step")
    print(f"ratio (method / backbone): {full / base:.2f}")


if __name__ == "__main__":
    main()
