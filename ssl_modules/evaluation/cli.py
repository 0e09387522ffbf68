"""``python -m ssl_modules evaluate``: the papers' evaluation protocols from the command line."""
from __future__ import annotations

import argparse
import os
import ast
import sys
from typing import Any

__all__ = ["build_parser", "main"]

_EXAMPLES = (
    "examples (one per paper result; docs/evaluation.md):\n"
    "  k-NN (DINO / BAM / CrIBo ImageNet):   evaluate run/backbone.pt --protocols knn --imagenet /data/imagenet\n"
    "  linear (BAM ImageNet):                evaluate last.ckpt --protocols linear --preset linear=bam"
    " --imagenet /data/imagenet\n"
    "  VOC linear segmentation (CrIBo):      evaluate last.ckpt --protocols voc-linear --preset voc-linear=cribo"
    " --voc /data/VOCdevkit\n"
    "  Hummingbird retrieval (CrIBo):        evaluate last.ckpt --protocols hummingbird --voc /data/VOCdevkit\n"
    "  several protocols, one extraction:      evaluate last.ckpt --protocols knn linear --imagenet /data/imagenet\n"
    "  fewer epochs:                           ... --set linear.epochs=10 --set hummingbird.memory_size=1024000\n"
    "  many GPUs:                              torchrun --nproc_per_node 8 -m ssl_modules evaluate ...\n"
)


def _presets_help() -> str:
    from .api import PRESETS

    lines = ["protocols and presets (the first preset of each protocol is its default):"]
    for protocol, presets in PRESETS.items():
        lines.append(f"  {protocol}")
        for name, paper in presets.items():
            lines.append(f"    {name:<14} {paper}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``evaluate``."""
    from .api import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="python -m ssl_modules evaluate",
        description="Evaluate a backbone with the papers' protocols (frozen backbone, float32 features).",
        epilog=_presets_help() + "\n\n" + _EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .ckpt of this library, an exported backbone .pt (with its .json), an "
                                      "official checkpoint (with --official) or a timm model name")
    parser.add_argument("--protocols", nargs="+", default=["knn"], choices=PROTOCOLS, metavar="PROTOCOL",
                        help=f"one or more of {', '.join(PROTOCOLS)} (default: knn)")
    parser.add_argument("--preset", action="append", default=[], metavar="PROTOCOL=PRESET",
                        help="the recipe of a protocol, e.g. linear=bam (see the list below)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="PROTOCOL.KEY=VALUE",
                        help="change one setting of a preset, e.g. linear.epochs=10")
    parser.add_argument("--imagenet", help="root with train/<class>/* and val/<class>/* (knn, linear)")
    parser.add_argument("--voc", help="Pascal VOC root: VOC2012/, VOCdevkit/VOC2012/ or the folder itself "
                                      "(voc-linear, hummingbird)")
    parser.add_argument("--voc-classes", type=int, default=21,
                        help="classes of the VOC-layout masks, background included (default 21, Pascal VOC)")
    parser.add_argument("--official", choices=["auto", "cribo", "bam", "vicregl"],
                        help="the model is an official checkpoint of this method (auto: from its layout)")
    parser.add_argument("--student", action="store_true", help="evaluate the student backbone instead of the teacher")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"],
                        help="feature precision (default 32: float32, as the protocols)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per extraction batch and process")
    parser.add_argument("--num-workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="loader workers per process (default: 4, or the CPUs this process may use if fewer)")
    parser.add_argument("--output", default="evaluation", help="folder for evaluation.json and evaluation.txt")
    parser.add_argument("--cache-dir", help="keep extracted features here between runs (keyed by the weights)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--timm-kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="timm.create_model argument for a timm name, e.g. img_size=32")
    return parser


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"evaluate: {what} {item!r} must look like KEY=VALUE")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse(argv: list[str]) -> dict[str, Any]:
    """``evaluate``'s keyword arguments from the command line."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in _pairs(args.overrides, "--set"):
        protocol, dot, name = key.partition(".")
        if not dot:
            raise SystemExit(f"evaluate: --set {key}=... must name the protocol, e.g. linear.epochs=10")
        overrides.setdefault(protocol, {})[name] = _value(value)
    return dict(model=args.model, protocols=args.protocols, imagenet=args.imagenet, voc=args.voc,
                voc_classes=args.voc_classes,
                presets=dict(_pairs(args.preset, "--preset")), overrides=overrides, official=args.official,
                teacher=not args.student, precision=args.precision, device=args.device, batch_size=args.batch_size,
                num_workers=args.num_workers, output=args.output, cache_dir=args.cache_dir,
                show_progress=not args.no_progress,
                timm_kwargs={k: _value(v) for k, v in _pairs(args.timm_kwarg, "--timm-kwarg")})


def _init_distributed() -> None:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def main(argv: list[str] | None = None) -> int:
    """Run ``evaluate``; prints the table and returns the exit status (0 on success, 2 on bad input)."""
    kwargs = parse(sys.argv[1:] if argv is None else list(argv))
    from .api import evaluate
    from .datasets import EvalDataError
    from .models import ModelSourceError

    _init_distributed()
    try:
        report = evaluate(**kwargs)
    except (EvalDataError, ModelSourceError, ValueError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 2
    from ssl_modules import distributed

    if distributed.rank() == 0:
        print(report.table())
        print(f"\nwritten: {kwargs['output']}/evaluation.json and evaluation.txt")
    return 0
