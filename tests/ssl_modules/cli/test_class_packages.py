"""Short class names on the command line come from the packages registered under an entry-point group."""
from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint

from ssl_modules.cli import _class_packages
from ssl_modules.cli._argument_errors import _resolve_class


def test_the_installed_library_registers_its_three_packages():
    assert _class_packages.class_package_names()[:3] == ("ssl_modules", "datamodules", "callbacks")


def test_a_users_registered_package_gives_its_classes_short_names(monkeypatch):
    user = types.ModuleType("user_probes")
    user.MyProbe = type("MyProbe", (), {})
    monkeypatch.setitem(sys.modules, "user_probes", user)
    registered = [EntryPoint("ssl_modules", "ssl_modules", _class_packages.ENTRY_POINT_GROUP),
                  EntryPoint("user_probes", "user_probes", _class_packages.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(_class_packages, "entry_points", lambda group: registered)
    assert _class_packages.class_package_names() == ("ssl_modules", "user_probes")
    assert user in _class_packages.import_class_packages()
    assert _resolve_class("MyProbe") is user.MyProbe


def test_without_metadata_the_librarys_own_packages_are_used(monkeypatch):
    monkeypatch.setattr(_class_packages, "entry_points", lambda group: [])
    assert _class_packages.class_package_names() == ("ssl_modules", "datamodules", "callbacks")
