"""The packages whose classes the command line accepts by their short names (``class_path: KNNProbe``).

They are found through the entry-point group ``ssl_modules.cli_classes`` of the installed distributions, not
imported by name here: the library's own (``ssl_modules``, ``datamodules``, ``callbacks``) are registered in
``pyproject.toml``, and a user's package can register itself the same way to make its classes short-named::

    [project.entry-points."ssl_modules.cli_classes"]
    my_package = "my_package"

Without the distribution's metadata (a source tree on ``PYTHONPATH`` that was never installed), the library's
own packages are used.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from types import ModuleType

from ssl_modules.cli._errors import PACKAGES

__all__ = ["ENTRY_POINT_GROUP", "class_package_names", "import_class_packages"]

ENTRY_POINT_GROUP = "ssl_modules.cli_classes"


def class_package_names() -> tuple[str, ...]:
    """The registered package names, the library's first."""
    registered = [entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)]
    ours = [name for name in PACKAGES if name in registered] or list(PACKAGES)
    return tuple(dict.fromkeys(ours + registered))


def import_class_packages() -> list[ModuleType]:
    """Import every registered package, so that its classes are known to jsonargparse by their short names."""
    return [importlib.import_module(name) for name in class_package_names()]
