"""``python -m ssl_modules evaluate``: the papers' evaluation protocols from the command line."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any, NoReturn

__all__ = ["build_parser", "main", "parse", "usable_cpus", "CommandLineParser", "UsageError"]

# Exit codes, the same in every command of ``python -m ssl_modules`` (docs/failures.md)
EXIT_FAILED = 1  # the evaluation failed: missing or unreadable data, model or checkpoint
EXIT_USAGE = 2  # a bad command line

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
    from ssl_modules.evaluation.api import PRESETS

    lines = ["protocols and presets (the first preset of each protocol is its default):"]
    for protocol, presets in PRESETS.items():
        lines.append(f"  {protocol}")
        for name, paper in presets.items():
            lines.append(f"    {name:<14} {paper}")
    return "\n".join(lines)


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS has one (Linux), else all of the
    machine's (macOS, Windows); at least 1."""
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        return max(1, len(affinity(0)))
    return max(1, os.cpu_count() or 1)


class UsageError(ValueError):
    """A bad command line, in one line for the user (exit code 2)."""


class CommandLineParser(argparse.ArgumentParser):
    """``argparse`` that raises :class:`UsageError` instead of printing its whole usage and exiting, so that a
    bad command line gets one line and the caller decides the exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} ({self.prog} --help lists the options)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``evaluate``."""
    from ssl_modules.evaluation.api import PROTOCOLS

    parser = CommandLineParser(
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
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read the model file with full unpickling even if it holds types a weights-only read "
                        "refuses (it can run code from the file: only for files you trust; docs/resume.md)")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"],
                        help="feature precision (default 32: float32, as the protocols)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: CUDA when available)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per extraction batch and process")
    parser.add_argument("--num-workers", type=int, default=min(4, usable_cpus()),
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
            raise UsageError(f"{what} {item!r} must look like KEY=VALUE")
        pairs.append((key.strip(), value.strip()))
    return pairs


def check_command_line(kwargs: dict[str, Any]) -> None:
    """A :class:`UsageError` for what the command line alone shows wrong: an unknown protocol, preset or setting
    (``api.check_settings``), a protocol without the data root it reads (``api.check_roots_given``). Checked
    before the model is loaded, so that a typo costs nothing and exits 2 (a failure while evaluating exits 1)."""
    from ssl_modules.evaluation.api import check_roots_given, check_settings

    presets, overrides = kwargs["presets"], kwargs["overrides"]
    try:
        for protocol in dict.fromkeys([*presets, *overrides]):
            check_settings(protocol, presets.get(protocol), overrides.get(protocol))
        check_roots_given(kwargs["protocols"], kwargs["imagenet"], kwargs["voc"])
    except ValueError as error:
        raise UsageError(str(error)) from None


def parse(argv: list[str]) -> dict[str, Any]:
    """``evaluate``'s keyword arguments from the command line; a :class:`UsageError` when it is wrong."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in _pairs(args.overrides, "--set"):
        protocol, dot, name = key.partition(".")
        if not dot:
            raise UsageError(f"--set {key}=... must name the protocol, e.g. linear.epochs=10")
        overrides.setdefault(protocol, {})[name] = _value(value)
    return dict(model=args.model, protocols=args.protocols, imagenet=args.imagenet, voc=args.voc,
                voc_classes=args.voc_classes,
                presets=dict(_pairs(args.preset, "--preset")), overrides=overrides, official=args.official,
                teacher=not args.student, precision=args.precision, device=args.device, batch_size=args.batch_size,
                num_workers=args.num_workers, output=args.output, cache_dir=args.cache_dir,
                show_progress=not args.no_progress,
                timm_kwargs={k: _value(v) for k, v in _pairs(args.timm_kwarg, "--timm-kwarg")},
                trust_checkpoint=args.trust_checkpoint)


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


def _parse_command_line(argv: list[str]) -> dict[str, Any] | int:
    """The keyword arguments of ``evaluate``, or exit code 2 after one line on stderr for a bad command line
    (``--help`` exits 0 through ``SystemExit``, as argparse does)."""
    try:
        kwargs = parse(argv)
        check_command_line(kwargs)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return kwargs


def main(argv: list[str] | None = None) -> int:
    """Run ``evaluate``; prints the table and returns the exit status: 0 on success, 1 when the evaluation fails
    (missing or unreadable data, model or checkpoint), 2 for a bad command line (``docs/failures.md``)."""
    kwargs = _parse_command_line(sys.argv[1:] if argv is None else list(argv))
    if isinstance(kwargs, int):
        return kwargs
    from ssl_modules.evaluation.api import evaluate

    _init_distributed()
    try:
        report = evaluate(**kwargs)
    except ValueError as error:  # EvalDataError, ModelSourceError, CheckpointFileError and the checks of the API
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    from ssl_modules.run import distributed

    if distributed.rank() == 0:
        print(report.table())
        print(f"\nwritten: {kwargs['output']}/evaluation.json and evaluation.txt")
    return 0
