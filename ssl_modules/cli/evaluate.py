"""``python -m ssl_modules evaluate``: the papers' evaluation protocols from the command line.

The options are ``ssl_modules.evaluation.evaluate``'s parameters, typed (``--batch_size 32``, ``--protocols knn
linear``), and each protocol's settings dataclass as nested options with its preset:
``--linear.preset bam --linear.epochs 10``, ``--knn.ks '[10, 20]'``, ``--hummingbird.memory_size 1024000``; a
setting given replaces the preset's value, the others keep it. ``--config file.yaml`` gives any of them as YAML::

    protocols: [linear, hummingbird]
    imagenet: /data/imagenet
    linear: {preset: bam, epochs: 10}

Exit codes: 0 success, 1 the evaluation failed (missing or unreadable data, model or checkpoint, a setting the
protocol refuses), 2 a bad command line, found before the model is loaded (``docs/failures.md``).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Literal

from ssl_modules.cli._errors import CommandLineError, RunError, exit_code
from ssl_modules.cli._parsing import add_flag, command_parser, parameter_help, parse_command_line
from ssl_modules.cli._run_checks import usable_cpus

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

__all__ = ["build_parser", "main", "parse", "usable_cpus"]

_EXAMPLES = (
    "examples (one per paper result; docs/evaluation.md):\n"
    "  k-NN (DINO / BAM / CrIBo ImageNet):   evaluate run/backbone.pt --protocols knn --imagenet /data/imagenet\n"
    "  linear (BAM ImageNet):                evaluate last.ckpt --protocols linear --linear.preset bam"
    " --imagenet /data/imagenet\n"
    "  VOC linear segmentation (CrIBo):      evaluate last.ckpt --protocols voc-linear --voc-linear.preset cribo"
    " --voc /data/VOCdevkit\n"
    "  Hummingbird retrieval (CrIBo):        evaluate last.ckpt --protocols hummingbird --voc /data/VOCdevkit\n"
    "  several protocols, one extraction:    evaluate last.ckpt --protocols knn linear --imagenet /data/imagenet\n"
    "  fewer epochs:                         ... --linear.epochs 10 --hummingbird.memory_size 1024000\n"
    "  ADE20K / Cityscapes / COCO-Stuff:     evaluate last.ckpt --protocols hummingbird --seg_dataset ade20k"
    " --seg_root /data/ADEChallengeData2016\n"
    "  the quickstart (48-px scenes, 7 mask classes; sizes follow the model's 32 px, --image_size to change):\n"
    "    evaluate last.ckpt --protocols knn linear hummingbird --imagenet $DATA/imagenet --voc $DATA/voc"
    " --voc_classes 7\n"
    "  mean ± std over seeds:                ... --protocols linear hummingbird --seeds 3\n"
    "  from a file:                          evaluate last.ckpt --config eval.yaml  (--print_config writes one)\n"
    "  many GPUs:                            torchrun --nproc_per_node 8 -m ssl_modules evaluate ...\n"
)
# evaluate()'s parameters that get their own typed option here (choices, flags) or are the nested groups
_OWN_OPTIONS = {"model", "protocols", "presets", "overrides", "official", "teacher", "precision", "device",
                "show_progress", "trust_checkpoint", "seg_dataset"}


def _settings_types() -> dict[str, type]:
    from ssl_modules.evaluation import HummingbirdSettings, KNNSettings, LinearSettings, VOCLinearSettings

    return {"knn": KNNSettings, "linear": LinearSettings, "voc-linear": VOCLinearSettings,
            "hummingbird": HummingbirdSettings}


def _presets_help() -> str:
    from ssl_modules.evaluation.api import PRESETS

    lines = ["protocols and presets (--<protocol>.preset; the first of each protocol is its default):"]
    for protocol, presets in PRESETS.items():
        lines.append(f"  {protocol}")
        lines += [f"    {name:<14} {paper}" for name, paper in presets.items()]
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The argument parser of ``evaluate``."""
    from ssl_modules.evaluation.api import PRESETS, PROTOCOLS, evaluate
    from ssl_modules.evaluation.layouts import SEGMENTATION_DATASETS

    parser = command_parser("evaluate", "Evaluate a backbone with the papers' protocols (frozen backbone, float32 "
                                        "features).", _presets_help() + "\n\n" + _EXAMPLES)
    doc = parameter_help(evaluate)
    parser.add_argument("model", type=str, help="a .ckpt of this library, an exported backbone (a .pt with its "
                        ".json, or a folder), an official checkpoint (with --official) or a timm model name")
    parser.add_argument("--protocols", nargs="+", type=Literal[tuple(PROTOCOLS)], default=["knn"],
                        help=doc.get("protocols", ""))
    parser.add_argument("--official", type=Literal["auto", "cribo", "bam", "vicregl"] | None, default=None,
                        help="the model is an official checkpoint of this method (auto: told from its layout)")
    parser.add_function_arguments(evaluate, as_group=False, skip=_OWN_OPTIONS)
    parser.set_defaults(num_workers=min(4, usable_cpus()), output="evaluation")
    parser.add_argument("--seg_dataset", type=Literal[tuple(SEGMENTATION_DATASETS)], default="voc",
                        help=doc.get("seg_dataset", ""))
    parser.add_argument("--precision", type=Literal["32", "bf16", "16"], default="32", help=doc.get("precision", ""))
    parser.add_argument("--device", type=str | None, default=None, help="cuda, cuda:1, cpu (default: this "
                        "process's CUDA device when there is one, else the CPU)")
    add_flag(parser, "teacher", doc.get("teacher", ""), default=True)
    add_flag(parser, "show_progress", doc.get("show_progress", ""), default=True)
    add_flag(parser, "trust_checkpoint", doc.get("trust_checkpoint", ""))
    for protocol, settings in _settings_types().items():
        _add_settings(parser, protocol, settings, tuple(PRESETS[protocol]))
    return parser


def _add_settings(parser: ArgumentParser, protocol: str, settings: type, presets: tuple[str, ...]) -> None:
    """``--<protocol>.preset`` and one option per field of the protocol's settings dataclass."""
    parser.add_class_arguments(settings, protocol, skip={"paper"})
    group = parser.groups[protocol]
    group.title = f"{protocol} settings (--protocols {protocol})"
    group.description = (f"  A setting given replaces the value of --{protocol}.preset's recipe; defaults shown: "
                         f"{settings.__name__}'s (the first preset's)")
    group.add_argument(f"--{protocol}.preset", type=Literal[presets] | None, default=None,
                       help=f"one of {', '.join(presets)} (default: {presets[0]}; the list is at the end)")


def parse(argv: list[str]) -> dict[str, Any]:
    """``evaluate``'s keyword arguments from the command line; a
    :class:`~ssl_modules.cli._errors.CommandLineError` for an unknown option or a value of the wrong type."""
    values, given = parse_command_line(build_parser(), list(argv), "evaluate")
    presets, overrides = {}, {}
    for protocol in _settings_types():
        preset, changed = _protocol_settings(given, protocol)
        if preset is not None:
            presets[protocol] = preset
        if changed:
            overrides[protocol] = changed
    kwargs = {name: values[name] for name in ("model", "protocols", "imagenet", "voc", "voc_classes", "seg_dataset",
                                              "seg_root", "image_size", "seeds", "official",
                                              "teacher", "precision", "device", "batch_size", "num_workers",
                                              "output", "cache_dir", "show_progress", "trust_checkpoint")}
    kwargs.update(presets=presets, overrides=overrides, timm_kwargs=dict(values["timm_kwargs"] or {}))
    return kwargs


def _protocol_settings(given: Namespace, protocol: str) -> tuple[str | None, dict[str, Any]]:
    """The preset and the settings the command line gave for ``protocol``; a nested setting (``voc-linear``'s
    ``recipe``) given in part keeps the preset's other values."""
    section = given.get(protocol.replace("-", "_"))
    changed = section.as_dict() if section is not None else {}
    preset = changed.pop("preset", None)
    for name, value in changed.items():
        if isinstance(value, dict):
            changed[name] = _merged(protocol, preset, name, value)
    return preset, changed


def _merged(protocol: str, preset: str | None, name: str, values: dict[str, Any]) -> Any:
    """The preset's ``name`` setting (a dataclass) with ``values`` replacing some of its fields; a value the
    dataclass refuses is a ``ValueError`` of the evaluation's (exit code 1), as for every other setting."""
    from ssl_modules.evaluation import resolve_settings

    return dataclasses.replace(getattr(resolve_settings(protocol, preset, None), name), **values)


def check_command_line(kwargs: dict[str, Any]) -> None:
    """A :class:`~ssl_modules.cli._errors.CommandLineError` for what the command line alone shows wrong: an unknown
    preset or setting (``api.check_settings``), a protocol without the data root it reads
    (``api.check_roots_given``). Checked before the model is loaded, so that a typo costs nothing and exits 2 (a
    failure while evaluating exits 1)."""
    from ssl_modules.evaluation.api import check_roots_given, check_settings

    presets, overrides = kwargs["presets"], kwargs["overrides"]
    try:
        for protocol in dict.fromkeys([*presets, *overrides]):
            check_settings(protocol, presets.get(protocol), overrides.get(protocol))
        check_roots_given(kwargs["protocols"], kwargs["imagenet"], kwargs["seg_root"] or kwargs["voc"],
                          kwargs["seg_dataset"])
    except ValueError as error:
        raise CommandLineError(f"error: {error} (python -m ssl_modules evaluate --help lists the options)") from None


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


def _evaluate(argv: list[str]) -> int:
    kwargs = parse(argv)
    check_command_line(kwargs)
    from ssl_modules.evaluation.api import evaluate
    from ssl_modules.run import distributed

    _init_distributed()
    try:
        report = evaluate(**kwargs)
    except ValueError as error:  # EvalDataError, ModelSourceError, CheckpointFileError and the checks of the API
        raise RunError(str(error)) from error
    if distributed.rank() == 0:
        print(report.table())
        print(f"\nwritten: {kwargs['output']}/evaluation.json and evaluation.txt")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``evaluate``; prints the table and returns the exit status: 0 on success, 1 when the evaluation fails
    (missing or unreadable data, model or checkpoint), 2 for a bad command line (``docs/failures.md``).
    ``--help`` and ``--print_config`` end with ``SystemExit(0)``."""
    return exit_code(lambda: _evaluate(sys.argv[1:] if argv is None else list(argv)))
