"""The distributed rows of the GPU suite: DDP vs FSDP2 for every method, and CrIBo's replicated vs sharded bank,
at one world size (``benchmarks/gpu_suite.py --world N`` runs this script and adds its rows to the table).

    python benchmarks/distributed_rows.py --world 8 --json rows.json           # paper shapes on 8 GPUs
    python benchmarks/distributed_rows.py --world 2 --smoke --json rows.json   # tiny shapes, 2 CPU processes

Lightning starts the other processes itself (it re-runs this script), so run it as a plain command, not under
torchrun. Each row trains ``warmup + steps`` steps of random views and reports, per process: the mean step time
after the warm-up, the peak GPU memory (``torch.cuda.max_memory_allocated``, NaN on CPU), the parameters and
memory-bank rows the process holds, and whether every loss was finite. The ratio column of each row is against
the first row of its method (DDP, replicated bank) measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_modules.testing import random_views  # noqa: E402

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def rows(smoke: bool) -> list[tuple[str, str, dict, list[int], int]]:
    """``(row name, strategy, model spec, crops, per-process batch)``; a model spec is ``class`` + kwargs."""
    if smoke:
        cribo = dict(cls="CrIBo", backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, out_dim=64,
                     object_out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32, num_clusters=4, queue_size=64)
        bam = dict(cls="BAM", backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, projector_widths=[64, 32],
                   top_k=4)
        vicregl = dict(cls="VICRegL", backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT,
                       expander_widths="64-64", projector_widths="32-32", num_matches=(2, 1))
        crops, local, batch = [32, 32], [32, 32, 16], 4
    else:
        cribo = dict(cls="CrIBo", backbone="vit_small_patch16_224")
        bam = dict(cls="BAM", backbone="vit_small_patch16_224")
        vicregl = dict(cls="VICRegL", backbone="convnext_small", alpha=0.75)
        crops, local, batch = [224, 224], [224, 224] + [96] * 6, 64
    return [
        ("cribo ddp replicated bank", "ddp", {**cribo, "memory_bank_sharding": "replicated"}, crops, batch),
        ("cribo ddp sharded bank", "ddp", {**cribo, "memory_bank_sharding": "sharded"}, crops, batch),
        ("cribo fsdp2 sharded bank", "fsdp2", {**cribo, "memory_bank_sharding": "sharded"}, crops, batch),
        ("bam ddp", "ddp", bam, local, batch),
        ("bam fsdp2", "fsdp2", bam, local, batch),
        ("vicregl ddp", "ddp", vicregl, local, batch),
        ("vicregl fsdp2", "fsdp2", vicregl, local, batch),
    ]


class StepClock(pl.Callback):
    """Wall time of each training step (synchronised on GPUs), the peak memory and the losses."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.losses, self._start = warmup, [], [], 0.0

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx == self.warmup and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())


def build(spec: dict) -> pl.LightningModule:
    import ssl_modules

    spec = dict(spec)
    return getattr(ssl_modules, spec.pop("cls"))(**spec)


def local_elements(module: torch.nn.Module) -> int:
    """Parameter elements this process holds (its shards under FSDP2)."""
    total = 0
    for param in module.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel()
    return total


def bank_rows(module: torch.nn.Module) -> int | None:
    bank = getattr(module, "memory_bank", None)
    if bank is None:
        return None
    shard = getattr(bank, "local_rows", None)
    return int(shard() if callable(shard) else shard) if shard is not None else int(bank.keys.shape[1])


def run_row(name: str, strategy: str, spec: dict, crops: list[int], batch: int, world: int, accelerator: str,
            precision: str, steps: int, warmup: int) -> dict | None:
    from lightning.pytorch.strategies import DDPStrategy

    from ssl_modules.run.sharding import FSDP2Strategy

    torch.manual_seed(0)
    module = build(spec)
    views = random_views(batch, crops, seed=0)
    loader = DataLoader(range(steps + warmup), batch_size=None, collate_fn=lambda _: views)
    clock = StepClock(warmup)
    chosen = FSDP2Strategy() if strategy == "fsdp2" else DDPStrategy()
    trainer = pl.Trainer(accelerator=accelerator, devices=world, strategy=chosen, precision=precision,
                         max_steps=steps + warmup, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    trainer.fit(module, loader)
    step = sum(clock.times) / max(len(clock.times), 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if accelerator == "gpu" else math.nan
    finite = bool(clock.losses) and bool(torch.isfinite(torch.stack(clock.losses)).all())
    row = dict(row=name, strategy=strategy, world=world, batch=batch, crops="+".join(map(str, crops)),
               step_ms=step * 1e3, images_per_s=batch * world / step, peak_gib=peak,
               parameters_per_process=local_elements(module), bank_rows_per_process=bank_rows(module),
               finite_loss=finite)
    return row if trainer.is_global_zero else None


def format_rows(results: list[dict]) -> str:
    head = (f"{'row':<28} {'world':>5} {'step ms':>9} {'ratio':>6} {'img/s':>9} {'peak GiB':>9} "
            f"{'params/proc':>12} {'bank rows/proc':>15} {'finite':>6}")
    lines = [head, "-" * len(head)]
    baseline: dict[str, float] = {}
    for r in results:
        method = r["row"].split()[0]
        base = baseline.setdefault(method, r["step_ms"])
        bank = "" if r["bank_rows_per_process"] is None else str(r["bank_rows_per_process"])
        lines.append(f"{r['row']:<28} {r['world']:>5} {r['step_ms']:>9.1f} {r['step_ms'] / base:>6.2f} "
                     f"{r['images_per_s']:>9.1f} {r['peak_gib']:>9.2f} {r['parameters_per_process']:>12,} "
                     f"{bank:>15} {str(r['finite_loss']):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2, help="processes (GPUs, or CPU processes with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (gloo), 32-true")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed (paper), 32-true (smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; 2 smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 smoke)")
    parser.add_argument("--rows", nargs="+", default=None, help="subset of the row names' first words (methods)")
    parser.add_argument("--json", type=Path, default=Path("distributed_rows.json"))
    args = parser.parse_args(argv)
    if args.world < 2:
        parser.error("--world must be at least 2: the rows compare distributed strategies")
    accelerator = "cpu" if args.smoke else "gpu"
    if accelerator == "gpu" and torch.cuda.device_count() < args.world:
        parser.error(f"--world {args.world} needs {args.world} GPUs, this machine has {torch.cuda.device_count()}; "
                     "use --smoke for CPU processes")
    precision = args.precision or ("32-true" if args.smoke else "bf16-mixed")
    steps, warmup = args.steps or (2 if args.smoke else 10), args.warmup or (1 if args.smoke else 3)
    results = []
    for name, strategy, spec, crops, batch in rows(args.smoke):
        if args.rows and name.split()[0] not in args.rows:
            continue
        row = run_row(name, strategy, spec, crops, batch, args.world, accelerator, precision, steps, warmup)
        if row is not None:
            results.append(row)
    if results:  # rank 0
        print(format_rows(results))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(world=args.world, precision=precision, date=time.strftime("%Y-%m-%d"),
                                             rows=results), indent=2))
    return results


if __name__ == "__main__":
    main()
