"""``python -m ssl_modules <command>`` (the ``ssl-modules`` script): the dispatcher of the commands.

``fit``/``validate``/``test``/``predict`` are Lightning's CLI (``ssl_modules.cli.lightning``), ``export``,
``evaluate`` and ``embed`` their own modules; every command parses its options with jsonargparse and takes
``--config``. Exit codes (``ssl_modules.cli._errors``): 0 success, 1 a failed run, 2 a bad command line, 128 + N
stopped by signal N. Importing this module imports neither torch nor Lightning, so ``--help`` is instant.
"""
from __future__ import annotations

import difflib
import importlib
import sys

from ssl_modules.cli._errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandLineError, exit_code

__all__ = ["HELP", "COMMANDS", "main"]

_LIGHTNING = ("fit", "validate", "test", "predict")  # ssl_modules.cli.lightning.SUBCOMMANDS, without importing it
COMMANDS = (*_LIGHTNING, "export", "evaluate", "embed")

HELP = """\
usage: python -m ssl_modules <command> [options]   (or: ssl-modules <command> ...)

Self-supervised pretraining of dense features (CrIBo, BAM, VICRegL) with Lightning.

commands:
  fit        train: python -m ssl_modules fit --config examples/configs/quickstart.yaml
             (resume: add --ckpt_path last; the backbone is exported to <run>/backbone.pt and <run>/backbone/)
  validate   run the config's probes on a checkpoint: ... validate --config <yaml> --ckpt_path <ckpt>
  test       Lightning's test loop
  predict    Lightning's predict loop
  export     write a checkpoint's backbone for timm: ... export <ckpt> <out.pt>  or  ... export <ckpt> <folder>
             (a folder: timm.create_model("local-dir:<folder>", pretrained=True) loads it)
  evaluate   offline evaluation protocols (k-NN, linear, segmentation, retrieval) on a checkpoint:
             ... evaluate <ckpt> --protocols linear --imagenet <root> --linear.preset bam --linear.epochs 10
  embed      global and patch features of a folder of images, in a safetensors file:
             ... embed <ckpt> --images <folder> --output features.safetensors

"python -m ssl_modules <command> --help" lists a command's options; every command takes --config <yaml>.
Exit codes: 0 success, 1 failed run or unreadable input, 2 bad command line, 128 + N stopped by signal N
(143: SIGTERM) with a checkpoint to resume from (docs/failures.md, docs/resume.md).
"""


def main(args: list[str] | None = None) -> int:
    """Entry point of ``python -m ssl_modules`` and the ``ssl-modules`` script; returns the exit code: 0 success,
    1 a failed run (bad data, checkpoint or file, non-finite loss, failed optional part), 2 a bad command line,
    128 + N stopped by signal N (``docs/failures.md``). Every error the user can fix is one short message."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return EXIT_OK if argv else EXIT_USAGE
    return exit_code(lambda: _run_command(argv))


def _run_command(argv: list[str]) -> int:
    """Run the command ``argv[0]``; its exit code (errors propagate to :func:`main`)."""
    command, arguments = argv[0], argv[1:]
    if command in ("export", "evaluate", "embed"):
        return _own_command(command, arguments)
    if command not in _LIGHTNING and not command.startswith("-"):
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CommandLineError(f"error: unknown command {command!r}{hint}\n\n{HELP}")
    return _lightning_command(argv)


def _own_command(command: str, arguments: list[str]) -> int:
    """``export``, ``evaluate`` or ``embed``: its module's ``main``; ``--help`` and ``--print_config`` exit 0."""
    try:
        module = importlib.import_module(f"ssl_modules.cli.{command}")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("ssl_modules.evaluation"):
            print(f"error: {command} needs ssl_modules.evaluation, which this installation lacks", file=sys.stderr)
            return EXIT_FAILED
        raise
    try:
        return int(module.main(arguments) or 0)
    except SystemExit as stop:
        if stop.code:
            raise
        return EXIT_OK


def _lightning_command(argv: list[str]) -> int:
    from ssl_modules.cli.lightning import run_cli
    from ssl_modules.cli._summary import stop_signal

    cli = run_cli(argv)
    signum = stop_signal(cli.trainer)
    if signum is not None:
        return 128 + signum  # what a shell reports for a process ended by that signal: the run is not done
    return EXIT_FAILED if getattr(cli, "failures", None) else EXIT_OK
