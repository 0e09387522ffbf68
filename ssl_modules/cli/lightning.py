"""``fit``, ``validate``, ``test``, ``predict``: Lightning's CLI (``SSLCLI``) with the library's checks and summary.

Any ``SSLModule`` subclass, any LightningDataModule and any callback (the library's or the user's) can be named
in a YAML config by class path (short names work for the library's own classes). Before anything runs: the
command line and ``--ckpt_path`` are checked (exit code 2 for a bad command line) and the run folders must be
writable; after ``fit`` the backbone is exported next to the logs (``backbone.pt`` with its ``.json``, and the
folder ``backbone/`` that ``timm.create_model("local-dir:...")`` loads) and a summary is printed.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssl_modules.cli._class_packages import import_class_packages
from ssl_modules.cli._argument_errors import refused_arguments, short_argument_error
from ssl_modules.cli._errors import CommandLineError, is_rank_zero
from ssl_modules.cli._run_checks import (
    FailedRunFolder,
    check_run_folders_writable,
    check_trains_something,
    trains_in_this_process,
    warn_more_processes_than_cores,
)
from ssl_modules.cli._summary import (
    CKPT_KEYWORDS,
    collect_failures,
    fit_summary,
    probe_report,
    progress_class,
    stop_signal,
)

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["SUBCOMMANDS", "SSLCLI", "run_cli", "quiet_lightning"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")


# ------------------------------------------------------------------------------------------- quiet
_PRECISE_WARNINGS = (
    # Lightning 2.6 on torch >= 2.10 (its own code, nothing a user can change)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # SSLModule normalises uint8 crops in on_after_batch_transfer by design (interface of the DataModules)
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    # Steps are logged every log_every_n_steps over the whole run, not per epoch: short epochs lose nothing
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # A resumed run writes into a new version folder by design; the checkpoint's own paths are not reused
    r"The dirpath has changed from",
    # fit runs no validation loader unless something consumes it (an empty one by design, docs/performance.md)
    r"Total length of `.*` across ranks is zero",
    # jsonargparse >= 4.49 on Lightning's own LightningCLI._add_instantiators
    r"(?s).*``ArgumentParser.add_instantiator`` was deprecated",
)


class _DropTips(logging.Filter):
    """Lightning's advertisement lines (``💡 Tip: ... try installing litlogger``) are not the user's concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Filter the warnings an ordinary run cannot avoid (listed precisely in ``_PRECISE_WARNINGS``)."""
    for pattern in _PRECISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


@contextlib.contextmanager
def _as_argv(argv: list[str]) -> Iterator[None]:
    """Run with ``sys.argv`` set to ``argv``, so LightningCLI (and a DDP launcher re-running ``sys.argv``) see
    exactly these arguments, without LightningCLI's warning about ``args`` next to ``sys.argv``."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "ssl_modules", *argv]
    try:
        yield
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------- the CLI
def _import_methods() -> None:
    """Import every method so that ``class_path: VICRegL`` resolves without the module path."""
    for name in ("vicregl", "bam", "cribo", "baselines"):
        importlib.import_module(f"ssl_modules.methods.{name}")


def _cli_class() -> type[LightningCLI]:
    """``SSLCLI``, defined on first use so that ``--help``, ``export`` and ``evaluate`` skip Lightning's CLI."""
    global SSLCLI
    built = globals().get("SSLCLI")
    if isinstance(built, type):
        return built
    from lightning.pytorch.cli import LightningCLI

    class _SSLCLI(LightningCLI):
        """LightningCLI in subclass mode for models and data; after ``fit``: export and a summary."""

        failures: list[str]
        exported: Path | None = None
        progress: Any = None  # RunProgress during fit
        _failed_run_folder: FailedRunFolder | None = None

        def before_fit(self) -> None:
            self._fit_started = time.perf_counter()

        def instantiate_classes(self) -> None:
            """Lightning's, with a constructor's refusal of its arguments (``ValueError``, Lightning's
            ``MisconfigurationException``) turned into a :class:`CommandLineError` naming the class and the
            arguments given for it."""
            try:
                super().instantiate_classes()
            except Exception as error:
                refused = refused_arguments(error, sys.argv[1:], self.config.get("subcommand") or "fit")
                if refused is None:
                    raise
                raise CommandLineError(refused) from None

        def after_instantiate_classes(self) -> None:
            """Before anything runs: the run folders must be writable, more processes than cores get a warning,
            and ``fit`` records what it does (``RunProgress``) and where a failed run may leave an empty folder."""
            subcommand = self.config.get("subcommand")
            if subcommand not in ("fit", "validate"):
                return
            check_run_folders_writable(self.trainer)
            warn_more_processes_than_cores(self.trainer)
            if subcommand == "fit" and trains_in_this_process(self.trainer):
                self.progress = progress_class()()
                self.trainer.callbacks.append(self.progress)
                if self.trainer.is_global_zero and is_rank_zero():
                    self._failed_run_folder = FailedRunFolder.plan(self.trainer)

        def _run_subcommand(self, subcommand: str) -> None:
            """Lightning's; a ``fit`` that fails before its first step leaves no empty run folder behind."""
            try:
                super()._run_subcommand(subcommand)
            except Exception:
                if self._failed_run_folder is not None and self.progress is not None and not self.progress.batches:
                    self._failed_run_folder.remove()
                raise

        def _parse_ckpt_path(self) -> None:
            """Lightning >= 2.5.5 calls this right after parsing, to apply a checkpoint's hyper-parameters over the
            config's. Here only where the config names no model (they then come from the checkpoint); otherwise
            ``before_instantiate_classes`` handles ``--ckpt_path``."""
            if self._subcommand_section() is not None and not self._config_names_model():
                self._check_ckpt_path()  # before Lightning reads the file
                super()._parse_ckpt_path()

        def before_instantiate_classes(self) -> None:
            """``--ckpt_path``: the file must be a readable checkpoint (checked before any run folder exists);
            ``last`` finds the run's newest checkpoint; another method's checkpoint fails naming both classes;
            the config's hyper-parameters are applied with the differences printed
            (``ssl_modules.run.resume.prepare_resume``; Lightning's own parse would silently apply the checkpoint's)."""
            from lightning.pytorch.utilities import rank_zero_only

            from ssl_modules.run.resume import prepare_resume

            self._check_ckpt_path()
            if self.config.get("subcommand") == "fit":
                check_trains_something(self._subcommand_section())
            if self._config_names_model():
                for line in prepare_resume(self._subcommand_section()):
                    rank_zero_only(print)(line)

        def _subcommand_section(self) -> Any:
            """The parsed config of the subcommand (``fit``, ``validate``, ...), or None without one."""
            subcommand = self.config.get("subcommand")
            return self.config[subcommand] if subcommand else None

        def _config_names_model(self) -> bool:
            section = self._subcommand_section()
            model = section.get("model") if section is not None else None
            return model is not None and bool(model.get("class_path"))

        def _check_ckpt_path(self) -> None:
            """A given ``--ckpt_path`` must be a readable checkpoint before the run folder is created."""
            from ssl_modules.checkpoints.reading import check_checkpoint_file

            subcommand = self.config.get("subcommand")
            path = self.config.get(subcommand, {}).get("ckpt_path") if subcommand else None
            if path and str(path) not in CKPT_KEYWORDS:
                check_checkpoint_file(path)

        def after_fit(self) -> None:
            # On every process: under DDP ``trainer.log_dir`` is a collective call (a broadcast from rank 0).
            trainer = self.trainer
            self.failures = collect_failures(trainer.callbacks)
            self._export_and_report(Path(trainer.log_dir or trainer.default_root_dir))
            if stop_signal(trainer) is not None:
                trainer.strategy.barrier("stopped by a signal")  # no process exits 128+N before rank 0 is done

        def after_validate(self) -> None:
            self.failures = collect_failures(self.trainer.callbacks)
            self._report_validate()

        def _export_and_report(self, run_dir: Path) -> None:
            from ssl_modules.run.sharding import gather_for_export, is_sharded

            backbone = self.model.embedding_backbone
            sharded = any(is_sharded(p) for p in backbone.parameters())
            if sharded and getattr(backbone, "gathered_export_state", None) is None:
                gather_for_export(backbone)  # any FSDP2 strategy: a collective, so rank 0 alone can write it
            if not self.trainer.is_global_zero:
                return
            self.exported = self.model.export_backbone(run_dir / "backbone.pt")
            self.model.export_backbone(run_dir / "backbone")  # the folder timm loads by name (local-dir:)
            started = getattr(self, "_fit_started", None)
            seconds = time.perf_counter() - started if started is not None else None
            print("\n".join(fit_summary(self.trainer, self.model, self.datamodule, run_dir, self.exported,
                                        seconds, self.failures, self.config, self.progress, sys.argv[1:])))

        def _report_validate(self) -> None:
            if not self.trainer.is_global_zero:
                return
            lines = probe_report(self.trainer.callbacks)
            if lines:
                print("\n".join(["", "Probe results:", *lines]))
            else:
                print("\nvalidate ran no probe: the config has no probe callbacks. Add one under "
                      "trainer.callbacks, e.g.\n  - class_path: callbacks.KNNProbe\n(examples/configs/quickstart.yaml "
                      "has all four), or run: python -m ssl_modules evaluate --help")
            for failure in self.failures:
                print(f"FAILED: {failure}")

    _SSLCLI.__name__ = _SSLCLI.__qualname__ = "SSLCLI"
    SSLCLI = _SSLCLI
    return SSLCLI


def __getattr__(name: str) -> Any:
    if name == "SSLCLI":
        return _cli_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_cli(argv: list[str]) -> LightningCLI:
    """Run a Lightning subcommand (``fit``, ``validate``, ...) and return the ``SSLCLI`` (for tests and scripts).

    Raises :class:`CommandLineError` for a bad command line; ``main`` turns it into exit code 2.
    """
    import torch
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningDataModule

    from ssl_modules.methods.base import SSLModule

    _import_methods()
    import_class_packages()  # the probes and data modules, for their short class names
    torch.set_float32_matmul_precision("high")
    quiet_lightning()
    subcommand = argv[0] if argv else "fit"
    try:
        with _as_argv(argv):
            return _cli_class()(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                                parser_kwargs={"exit_on_error": False})
    except ArgumentError as error:
        raise CommandLineError(short_argument_error(error, subcommand)) from None
