"""One command for the speed and memory of every method at its paper shapes, on one GPU.

    python benchmarks/gpu_suite.py                # paper shapes, bf16-mixed, on the GPU (< 8 min on one H200-class GPU)
    python benchmarks/gpu_suite.py --smoke        # tiny shapes on the CPU (what the test suite runs)
    python benchmarks/gpu_suite.py --cases cribo_vit_s16 --json out.json
    python benchmarks/gpu_suite.py --world 8         # + the distributed rows on 8 GPUs (distributed_rows.py)

For each case: the full training step inside a ``Trainer`` (forward, losses, backward, optimizer step, EMA),
the bare backbone work over the same crops (student forward + backward, teacher forward; see
``step_overhead.py``), their ratio, images per second, the peak GPU memory of the step
(``torch.cuda.max_memory_allocated``) and whether every loss was finite. Then the data pipeline's views per
second on one CPU core (one DataLoader worker) for each paper recipe. With ``--world N`` it adds the distributed
rows of ``distributed_rows.py`` on N GPUs (N CPU processes with ``--smoke``): DDP vs FSDP2 for every method and
CrIBo's replicated vs sharded memory bank (step time, peak memory, parameters and bank rows per process). Prints
one table and writes JSON.

Cases (per-GPU batch 64, as in the papers' 1024-image batches on 16 GPUs):
- ``cribo_vit_s16``: CrIBo ViT-S/16, 2 x 224, its full memory bank (25,000 images x 32 objects = 800k rows).
- ``bam_vit_s16``: BAM ViT-S/16 with teacher, 2 x 224 + 6 x 96.
- ``vicregl_r50``: VICRegL ResNet-50, alpha 0.75, 2 x 224 (the paper's ResNet recipe has no local crops).
- ``vicregl_convnext_s``: VICRegL ConvNeXt-S, alpha 0.75, 2 x 224 + 6 x 96.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_overhead import time_backbone, time_method  # noqa: E402

from ssl_modules.testing import random_views  # noqa: E402

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


@dataclass
class Case:
    name: str
    build: Callable[[], pl.LightningModule]
    crops: list[int]
    batch: int


def paper_cases() -> list[Case]:
    from ssl_modules import BAM, CrIBo, VICRegL

    return [
        Case("cribo_vit_s16", lambda: CrIBo("vit_small_patch16_224"), [224, 224], 64),
        Case("bam_vit_s16", lambda: BAM("vit_small_patch16_224"), [224, 224] + [96] * 6, 64),
        Case("vicregl_r50", lambda: VICRegL("resnet50", alpha=0.75), [224, 224], 64),
        Case("vicregl_convnext_s", lambda: VICRegL("convnext_small", alpha=0.75), [224, 224] + [96] * 6, 64),
    ]


def smoke_cases() -> list[Case]:
    from ssl_modules import BAM, CrIBo, VICRegL

    return [
        Case("cribo_vit_s16", lambda: CrIBo("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, out_dim=256,
                                            object_out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32,
                                            num_clusters=4, queue_size=256), [32, 32], 8),
        Case("bam_vit_s16", lambda: BAM("vit_tiny_patch16_224", backbone_kwargs=TINY_VIT, projector_widths=[64, 32],
                                        top_k=4), [32, 32, 16, 16], 8),
        Case("vicregl_r50", lambda: VICRegL("resnet18", alpha=0.75, expander_widths="64-64",
                                            projector_widths="32-32", num_matches=(4, 2)), [64, 64], 8),
        Case("vicregl_convnext_s", lambda: VICRegL("convnext_atto", alpha=0.75, expander_widths="64-64",
                                                   projector_widths="32-32", num_matches=(4, 2)), [64, 64, 64], 8),
    ]


class LossWatch(pl.Callback):
    """Records whether every step's loss was finite (read once, after the run: no sync per step)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(loss.detach())

    def all_finite(self) -> bool:
        return bool(self.losses) and bool(torch.isfinite(torch.stack(self.losses)).all())


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan


def run_case(case: Case, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    module = case.build()
    views = random_views(case.batch, case.crops)
    _peak_reset(device)
    base = time_backbone(module, views, steps, warmup, device, precision)
    base_peak = _peak_gib(device)
    watch = LossWatch()
    _peak_reset(device)
    full = time_method(module, views, steps, warmup, device, precision, callbacks=[watch])
    result = dict(case=case.name, batch=case.batch, crops="+".join(map(str, case.crops)), step_ms=full * 1e3,
                  backbone_ms=base * 1e3, ratio=full / base, images_per_s=case.batch / full,
                  peak_gib=_peak_gib(device), backbone_peak_gib=base_peak, finite_loss=watch.all_finite())
    del module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def pipeline_rates(presets: list[str], seconds: float, smoke: bool) -> dict[str, float]:
    """Views per second of ``MultiCropViews`` in this process with one thread (one loader worker, one core)."""
    from views_throughput import images_per_second, make_jpegs, ours_pipeline

    from datamodules.views import MultiCropViews

    torch.set_num_threads(1)
    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(Path(folder), 2 if smoke else 8, *((64, 80) if smoke else (400, 500)))
        for name in presets:
            overrides = dict(global_size=32, local_size=16) if smoke else {}
            views = MultiCropViews.preset(name, **overrides)
            rates[name] = images_per_second(ours_pipeline(views, normalize=False), paths, seconds) * views.num_views
    return rates


def format_table(results: list[dict], rates: dict[str, float], device: str, precision: str) -> str:
    head = (f"{'case':<20} {'batch':>5} {'crops':<16} {'step ms':>9} {'bare ms':>9} {'ratio':>6} {'img/s':>8} "
            f"{'peak GiB':>9} {'finite':>6}")
    lines = [f"device: {device}   precision: {precision}", head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['case']:<20} {r['batch']:>5} {r['crops']:<16} {r['step_ms']:>9.1f} {r['backbone_ms']:>9.1f} "
                     f"{r['ratio']:>6.2f} {r['images_per_s']:>8.1f} {r['peak_gib']:>9.2f} {str(r['finite_loss']):>6}")
    lines.append("")
    lines.append("data pipeline, views/s on one CPU core (uint8 crops, normalised later on the device):")
    lines += [f"  {name:<18} {rate:>8.1f}" for name, rate in rates.items()]
    return "\n".join(lines)


def distributed_rows(world: int, smoke: bool, precision: str) -> list[dict]:
    """The rows of ``distributed_rows.py`` at ``world`` processes, run as its own command (Lightning starts the
    other processes by re-running it); its table is printed as it comes."""
    script = Path(__file__).resolve().parent / "distributed_rows.py"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rows.json"
        command = [sys.executable, str(script), "--world", str(world), "--precision", precision, "--json", str(out),
                   *(["--smoke"] if smoke else [])]
        print(f"\ndistributed rows, {world} processes:", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        print(done.stdout[done.stdout.find("row "):])
        return json.loads(out.read_text())["rows"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 32-true, 2 steps")
    parser.add_argument("--cases", nargs="+", default=None, help="subset of the case names")
    parser.add_argument("--device", default=None, help="default: cuda for the paper shapes, cpu for --smoke")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed (paper), 32-true (smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10; 2 smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 smoke)")
    parser.add_argument("--pipeline-seconds", type=float, default=None)
    parser.add_argument("--world", type=int, default=1,
                        help="also the distributed rows (DDP vs FSDP2, replicated vs sharded bank) on this many GPUs")
    parser.add_argument("--json", type=Path, default=Path("gpu_suite.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --smoke for the CPU mode")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = args.precision or ("32-true" if args.smoke else "bf16-mixed")
    steps, warmup = args.steps or (2 if args.smoke else 10), args.warmup or (1 if args.smoke else 3)
    cases = smoke_cases() if args.smoke else paper_cases()
    if args.cases:
        unknown = set(args.cases) - {c.name for c in cases}
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; choose from {[c.name for c in cases]}")
        cases = [c for c in cases if c.name in args.cases]
    start = time.perf_counter()
    results = [run_case(case, device, precision, steps, warmup) for case in cases]
    rates = pipeline_rates(["cribo", "bam", "vicregl_resnet", "vicregl_convnext"],
                           args.pipeline_seconds or (0.2 if args.smoke else 3.0), args.smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(format_table(results, rates, name, precision))
    distributed = distributed_rows(args.world, args.smoke, precision) if args.world > 1 else []
    report = dict(device=name, precision=precision, torch=torch.__version__, steps=steps, warmup=warmup,
                  date=time.strftime("%Y-%m-%d"), seconds=time.perf_counter() - start, cases=results,
                  pipeline_views_per_s_per_core=rates, distributed=distributed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
