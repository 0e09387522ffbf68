"""``python -m ssl_modules fit|validate|test|predict|export|evaluate|embed`` (the ``ssl-modules`` console script).

Modules by role: ``lightning`` (``fit``/``validate``/...: ``SSLCLI``, ``run_cli``), ``export``, ``evaluate`` and
``embed`` (their commands), and the internal ``_main`` (the dispatcher), ``_errors`` (exit codes, messages),
``_argument_errors`` (did-you-mean, short parse errors), ``_parsing`` (typed options with jsonargparse),
``_run_checks`` (checks before a run), ``_summary`` (the end-of-fit summary). ``SSLCLI`` and ``run_cli`` are loaded
on first use, so that ``--help`` imports no Lightning.
"""
from __future__ import annotations

from typing import Any

from ssl_modules.cli._main import main

__all__ = ["main", "run_cli", "SSLCLI"]


def __getattr__(name: str) -> Any:
    if name in ("run_cli", "SSLCLI"):
        from ssl_modules.cli import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
