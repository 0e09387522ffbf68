"""``python -m ssl_modules export <checkpoint> <output>``: a checkpoint's (teacher) backbone for timm.

The options are the parameters of :func:`export`, typed; ``--config file.yaml``
gives them as YAML. The output names the layout: a ``.pt`` file (the state dict, with a ``.json`` of the timm name
and kwargs beside it) or a folder (``config.json`` and ``model.safetensors``, which
``timm.create_model("local-dir:<folder>", pretrained=True)`` loads). Exit codes: 0 written, 1 an unreadable or
unfit checkpoint, non-finite weights or an unwritable output, 2 a bad command line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ssl_modules.cli._errors import CommandLineError, exit_code
from ssl_modules.cli._parsing import add_flag, command_parser, parameter_help, parse_command_line

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

__all__ = ["build_parser", "export", "main"]

_EXAMPLES = (
    "examples:\n"
    "  a .pt and its .json:             export runs/.../last.ckpt backbone.pt\n"
    "  a folder timm loads by name:     export runs/.../last.ckpt exports/cribo_vits16\n"
    "                                   then timm.create_model('local-dir:exports/cribo_vits16', pretrained=True)\n"
    "  an official checkpoint:          export checkpoint.pth backbone.pt --official auto\n"
    "  ... whose backbone is not told:  export model.pth out/ --official vicregl --backbone convnext_small\n"
)


def export(checkpoint: str | Path, output: str | Path,
           official: Literal["auto", "cribo", "bam", "vicregl"] | None = None, backbone: str | None = None,
           backbone_kwargs: dict[str, Any] | None = None, trust_checkpoint: bool = False) -> Path:
    """Write the (teacher's, where there is one) backbone of a checkpoint for timm; returns ``output``.

    Args:
        checkpoint: a Lightning checkpoint (.ckpt) of an SSLModule, or an official CrIBo / BAM / VICRegL
            training checkpoint with --official.
        output: a .pt file (the state dict, with a .json of the timm name and kwargs beside it) or a folder
            (config.json and model.safetensors: timm.create_model("local-dir:<folder>", pretrained=True)).
        official: the checkpoint is an official one of this method (auto: told from its keys); its teacher
            backbone is written (docs/fidelity.md).
        backbone: with --official: the timm name, when the checkpoint's shapes and args do not tell it.
        backbone_kwargs: with --official: timm.create_model keyword arguments of the backbone.
        trust_checkpoint: read the checkpoint with full unpickling even if it holds types a weights-only read
            refuses (it runs code from the file: only for files you trust; docs/resume.md).
    """
    from ssl_modules.checkpoints.export import export_checkpoint, export_layout

    if official is None:
        if backbone is not None or backbone_kwargs:
            raise ValueError("backbone and backbone_kwargs describe an official checkpoint's backbone: give them "
                             "with --official (a checkpoint of this library records its backbone)")
        return export_checkpoint(checkpoint, output, trust_checkpoint)
    from ssl_modules.methods.official import export_official

    export_layout(output)  # before the checkpoint is read
    given = {k: v for k, v in (("backbone", backbone), ("backbone_kwargs", backbone_kwargs)) if v}
    return export_official(checkpoint, output, None if official == "auto" else official,
                           trust_checkpoint=trust_checkpoint, **given)


def build_parser() -> ArgumentParser:
    """The argument parser of ``export``: the parameters of :func:`export`."""
    parser = command_parser("export", "Write the (teacher) backbone of a checkpoint as timm weights.", _EXAMPLES)
    parser.add_function_arguments(export, as_positional=True, as_group=False, skip={"trust_checkpoint"})
    add_flag(parser, "trust_checkpoint", parameter_help(export).get("trust_checkpoint", ""))
    return parser


def _export(argv: list[str]) -> int:
    from ssl_modules.checkpoints.export import ExportLayoutError, export_layout

    values, _ = parse_command_line(build_parser(), argv, "export")
    kwargs = values.as_dict()
    kwargs.pop("config", None)
    try:
        layout = export_layout(kwargs["output"])  # checked before the checkpoint is read
    except ExportLayoutError as error:
        raise CommandLineError(f"error: {error}") from None
    if kwargs["official"] is None and (kwargs["backbone"] or kwargs["backbone_kwargs"]):  # before any reading
        raise CommandLineError("error: --backbone and --backbone_kwargs describe an official checkpoint's backbone: "
                               "give them with --official (a checkpoint of this library records its backbone)")
    path = export(**kwargs)
    if layout == "file":
        print(f"backbone written to {path} (timm name and kwargs in {path.with_suffix('.json')})")
    else:
        print(f"backbone written to {path} (config.json and model.safetensors: "
              f"timm.create_model('local-dir:{path}', pretrained=True) loads it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``export``; returns the exit status (0 written, 1 failed, 2 a bad command line). ``--help`` and
    ``--print_config`` end with ``SystemExit(0)``."""
    return exit_code(lambda: _export(sys.argv[1:] if argv is None else list(argv)))
