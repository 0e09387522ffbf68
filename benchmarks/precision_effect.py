"""How far one training step's gradients move from float32 under fp16 and under bf16 autocast, per method.

    python benchmarks/precision_effect.py                  # CrIBo, BAM, VICRegL; 5 batches each
    python benchmarks/precision_effect.py --methods bam --seeds 5 --batch-size 32

Each method is built from its tiny config (``examples/configs/<method>/synthetic_tiny.yaml``: the model's
arguments and the crop sizes; CrIBo with the cross-image loss on from step 0, so that all three of its losses
reach the gradient). For every batch (random pixels, ``ssl_modules.testing.random_views``) the same module
state takes one ``training_step`` + ``backward``:

- in float32 (the reference);
- under ``torch.autocast("cpu", dtype=torch.float16)`` with the loss multiplied by the largest power of two
  up to 2**16 that leaves every gradient finite and divided out afterwards: what a GradScaler settles on, as in
  the official recipes (BAM ``--use_fp16 true``, CrIBo ``use_fp16``, VICRegL ``--fp16``) and ``16-mixed``;
- under ``torch.autocast("cpu", dtype=torch.bfloat16)`` without scaling (``bf16-mixed``).

It prints, per method, the relative error ``||g - g_fp32|| / ||g_fp32||`` of the gradient of every trainable
parameter (concatenated) and of the loss, averaged over the batches, the ratio bf16 / fp16 measured in the
same run, and the smallest fp16 loss scale used. CPU autocast casts fewer operations to float32 than CUDA
autocast (e.g. ``norm``), so on a GPU both half precisions may land somewhat closer to float32; the ratio is
what the docs quote. CrIBo's errors include discrete changes (a cluster or a neighbour picked differently
from half-precision teacher features), so they vary more from batch to batch.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_modules.testing import random_views  # noqa: E402

METHODS = ("cribo", "bam", "vicregl")
OVERRIDES = {"cribo": {"cross_image_start_epoch": 0}}  # all three CrIBo losses in the step


def tiny_config(method: str) -> dict[str, Any]:
    """The model section and the crop sizes of the method's ``synthetic_tiny.yaml``."""
    config = yaml.safe_load((ROOT / "examples" / "configs" / method / "synthetic_tiny.yaml").read_text())
    views = config["data"]["init_args"]["views"]["init_args"]
    sizes = [views["global_size"]] * views["n_global"] + [views.get("local_size", 0)] * views["n_local"]
    return {"model": config["model"], "sizes": sizes}


def build(model: dict[str, Any], overrides: dict[str, Any]) -> torch.nn.Module:
    """The module of a ``class_path`` / ``init_args`` section."""
    module_name, class_name = model["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**{**model["init_args"], **overrides})


def gradient(module: torch.nn.Module, views, seed: int, dtype: torch.dtype | None, scale: float = 1.0):
    """``(loss, flat gradient)`` of one step of a copy of ``module`` (its buffers change in a step)."""
    step_module = copy.deepcopy(module)
    torch.manual_seed(seed)  # the same draws (drop path, initial centroids) in every precision
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    with autocast:
        loss = step_module.training_step(views, 0)["loss"]
    (loss.float() * scale).backward()
    grads = [p.grad.reshape(-1) / scale if p.grad is not None else torch.zeros(p.numel())
             for p in step_module.parameters() if p.requires_grad]
    return float(loss), torch.cat(grads).double()


def fp16_gradient(module: torch.nn.Module, views, seed: int):
    """The fp16 step with the loss scale a GradScaler settles on: the largest power of two <= 2**16 with
    finite gradients."""
    scale = 2.0**16
    while scale >= 1.0:
        loss, grad = gradient(module, views, seed, torch.float16, scale)
        if torch.isfinite(grad).all():
            return loss, grad, scale
        scale /= 2
    raise RuntimeError("fp16 gradients are not finite even without loss scaling")


def relative_error(value: torch.Tensor | float, reference: torch.Tensor | float) -> float:
    value, reference = torch.as_tensor(value, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return float((value - reference).norm() / reference.norm())


def measure(method: str, seeds: int, batch_size: int) -> dict[str, float]:
    """Mean relative errors of the gradient and the loss under fp16 and bf16 over ``seeds`` batches."""
    config = tiny_config(method)
    torch.manual_seed(0)
    module = build(config["model"], OVERRIDES.get(method, {}))
    errors: dict[str, list[float]] = {k: [] for k in ("grad_fp16", "grad_bf16", "loss_fp16", "loss_bf16", "scale")}
    for seed in range(seeds):
        views = random_views(batch_size, config["sizes"], seed=seed)
        loss32, grad32 = gradient(module, views, seed, None)
        loss16, grad16, scale = fp16_gradient(module, views, seed)
        lossbf, gradbf = gradient(module, views, seed, torch.bfloat16)
        errors["grad_fp16"].append(relative_error(grad16, grad32))
        errors["grad_bf16"].append(relative_error(gradbf, grad32))
        errors["loss_fp16"].append(relative_error(loss16, loss32))
        errors["loss_bf16"].append(relative_error(lossbf, loss32))
        errors["scale"].append(scale)
    return {**{k: statistics.mean(v) for k, v in errors.items()}, "scale": min(errors["scale"])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, default=5, help="batches averaged per method")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # self.log outside a Trainer
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"one training step vs float32, CPU autocast, batch {args.batch_size}, mean of {args.seeds} batches")
    print(f"{'method':<8} {'grad fp16':>10} {'grad bf16':>10} {'bf16/fp16':>9} {'loss fp16':>10} "
          f"{'loss bf16':>10} {'min scale':>10}")
    for method in args.methods:
        r = measure(method, args.seeds, args.batch_size)
        print(f"{method:<8} {r['grad_fp16']:>10.2e} {r['grad_bf16']:>10.2e} {r['grad_bf16'] / r['grad_fp16']:>9.1f} "
              f"{r['loss_fp16']:>10.2e} {r['loss_bf16']:>10.2e} {r['scale']:>10.0f}")


if __name__ == "__main__":
    main()
