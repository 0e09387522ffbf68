"""The dependency direction of docs/architecture.md:
contracts <- functional <- backbones/heads/mixins <- base <- methods <- cli, and contracts <- datamodules.

``ssl_modules.contracts`` (the ``Views`` batch and the ``Features`` of a backbone) imports only torch, so the
data package can use it without depending on the methods: ``datamodules`` loads no other part of
``ssl_modules`` (the package's ``__init__`` loads its public names lazily) and none of ``callbacks``.
"""
import subprocess
import sys

import pytest


def _loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def _ours(loaded: set[str]) -> set[str]:
    return {name for name in loaded if name.split(".")[0] in ("ssl_modules", "datamodules", "callbacks")}


def test_functional_core_does_not_import_lightning():
    loaded = _loaded_after_import("ssl_modules.functional")
    assert not any(name.split(".")[0] in ("lightning", "pytorch_lightning") for name in loaded)


def test_the_contracts_import_only_torch():
    loaded = _loaded_after_import("ssl_modules.contracts")
    assert _ours(loaded) == {"ssl_modules", "ssl_modules.contracts"}
    assert not any(name.split(".")[0] in ("lightning", "timm", "torchvision") for name in loaded)


@pytest.mark.parametrize("module", ["datamodules"])
def test_datamodules_use_only_the_contracts_of_ssl_modules(module):
    loaded = _loaded_after_import(module)
    assert {name for name in _ours(loaded) if not name.startswith("datamodules")} == {"ssl_modules",
                                                                                     "ssl_modules.contracts"}
