"""Exit codes and the one message of an error the user can fix (``docs/failures.md``).

0 success; 1 a failed run (bad data, checkpoint or file, non-finite loss, failed optional part, any ``ValueError``
raised while evaluating); 2 a bad command line (unknown option, wrong type, missing argument, bad preset, ...),
found before anything runs; 128 + N stopped by signal N. Imports nothing heavy: ``--help`` stays fast.
"""
from __future__ import annotations

import errno
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "CommandLineError", "RunError", "failure_message",
           "exit_code", "is_rank_zero"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # and 128 + N: stopped by signal N
PACKAGES = ("ssl_modules", "datamodules", "callbacks")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class CommandLineError(ValueError):
    """A bad command line (unknown option, wrong type, ...), already shortened for the user (exit code 2)."""


class RunError(RuntimeError):
    """A run that cannot go on (exit code 1), already worded for the user: what is wrong and how to fix it."""


def is_rank_zero() -> bool:
    """Whether this process is the first of a distributed launch (or the only one)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def exit_code(run: Callable[[], int]) -> int:
    """``run()``'s exit code, with a :class:`CommandLineError` printed and turned into 2 and a failure the user can
    fix (:func:`failure_message`) printed and turned into 1; anything else (a bug) keeps its traceback."""
    try:
        return run()
    except CommandLineError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:
        message = failure_message(error)
        if message is None:
            raise
        if message:
            print(message, file=sys.stderr)
        return EXIT_FAILED


def failure_message(error: BaseException) -> str | None:
    """The one message for a run that failed on something the user can fix (exit code 1): the library's own
    errors (bad data or checkpoint, non-finite loss, a check of an argument during the run) and a file that
    cannot be written; ``""`` where another process prints it; None for anything else (a bug: its traceback
    is shown)."""
    from ssl_modules.checkpoints.reading import CheckpointFileError
    from ssl_modules.run.guard import NonFiniteLossError

    if isinstance(error, NonFiniteLossError):
        return f"error: {error}" if is_rank_zero() else ""  # every process stops together; one message
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE and error.filename:
        return (f"error: cannot write {error.filename}: {error.strerror}. Choose a folder you can write to "
                "(--trainer.default_root_dir, a ModelCheckpoint's dirpath, export's output), or change its permissions")
    if isinstance(error, (RunError, CheckpointFileError)) or _raised_by_the_library(error):
        return f"error: {error}"
    return None


def _raised_by_the_library(error: BaseException) -> bool:
    """Whether ``error`` is a check of the library's: a ``ValueError``, ``TypeError`` or missing file raised by
    the code of ``ssl_modules``, ``datamodules`` or ``callbacks`` itself, with its own message."""
    if not isinstance(error, (ValueError, TypeError, FileNotFoundError)) or not str(error):
        return False
    frame_tb = error.__traceback__
    if frame_tb is None:
        return False
    while frame_tb.tb_next is not None:
        frame_tb = frame_tb.tb_next
    raised_in = Path(frame_tb.tb_frame.f_code.co_filename).resolve()
    specs = [importlib.util.find_spec(name) for name in PACKAGES]  # where the packages are, without importing them
    roots = [Path(spec.origin).resolve().parent for spec in specs if spec is not None and spec.origin]
    return any(root in raised_in.parents for root in roots)
