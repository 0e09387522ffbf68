"""The command lines of ``evaluate`` and ``export``: typed options built with jsonargparse from the functions they
call, a ``--config`` YAML as ``fit`` has, help in ``fit``'s style, and every error of the command line as one
:class:`~ssl_modules.cli._errors.CommandLineError` (exit code 2).

Option names are written as in ``fit`` (``--batch_size``, ``--linear.epochs``); the same names with dashes
(``--batch-size``, ``--trust-checkpoint``) are accepted too. A flag (``--trust_checkpoint``) may stand alone or take
``true``/``false``.
"""
from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ssl_modules.cli._argument_errors import short_parse_error
from ssl_modules.cli._errors import CommandLineError

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

__all__ = ["command_parser", "add_flag", "parameter_help", "parse_command_line", "option_names"]


def command_parser(command: str, description: str, epilog: str = "") -> ArgumentParser:
    """A jsonargparse parser for ``python -m ssl_modules <command>`` with ``-c/--config``, raising on errors."""
    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
        """jsonargparse's help (as ``fit --help``), with the epilog's lists kept as written."""

    parser = ArgumentParser(prog=f"python -m ssl_modules {command}", description=description, epilog=epilog,
                            exit_on_error=False, allow_abbrev=False, formatter_class=HelpFormatter)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML file of these options (keys: the option names without --, nested as the dots "
                             "say); options after it on the command line override it")
    return parser


def add_flag(parser: ArgumentParser, name: str, help: str, default: bool = False) -> None:
    """A boolean option that may stand alone (``--name`` = true) or take ``true``/``false`` (a YAML key too)."""
    parser.add_argument(f"--{name}", type=bool, nargs="?", const=True, default=default, help=help)


def parameter_help(function: Callable[..., Any]) -> dict[str, str]:
    """``{parameter: its description}`` from the ``Args:`` section of ``function``'s docstring."""
    try:
        import docstring_parser
    except ImportError:  # jsonargparse[signatures] brings it; without it the options have no text
        return {}
    doc = docstring_parser.parse(inspect.getdoc(function) or "")
    return {param.arg_name.lstrip("*"): " ".join((param.description or "").split()) for param in doc.params}


def option_names(parser: ArgumentParser) -> list[str]:
    """Every long option of ``parser`` (``--batch_size``, ``--linear.epochs``, ...)."""
    return [name for action in parser._actions for name in action.option_strings if name.startswith("--")]


def _with_known_spelling(argv: list[str], known: set[str]) -> list[str]:
    """``argv`` with options written with dashes where the parser has them with underscores (``--batch-size``)."""
    spelled = []
    for token in argv:
        name, equals, value = token.partition("=")
        if token.startswith("--") and name not in known and "--" + name[2:].replace("-", "_") in known:
            token = "--" + name[2:].replace("-", "_") + equals + value
        spelled.append(token)
    return spelled


def parse_command_line(parser: ArgumentParser, argv: list[str], command: str) -> tuple[Namespace, Namespace]:
    """``(values, given)``: every option with its default, and only the options the command line or a
    ``--config`` file gave. ``--help`` and ``--print_config`` exit with ``SystemExit(0)``; a bad command line
    raises :class:`CommandLineError` with one line."""
    from jsonargparse import ArgumentError

    names = option_names(parser)
    argv = _with_known_spelling(list(argv), set(names))
    try:
        values = parser.parse_args(argv)
        given = parser.parse_args(argv, defaults=False)
    except ArgumentError as error:
        raise CommandLineError(short_parse_error(str(error), command, names)) from None
    return values, given
