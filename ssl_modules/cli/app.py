"""Command line: ``python -m ssl_modules fit|validate|test|predict|export|evaluate ...``.

``fit``/``validate``/... are Lightning's CLI: any ``SSLModule`` subclass, any LightningDataModule and any
callback — the library's or the user's — can be named in a YAML config by class path (short names work for
the library's own classes). After ``fit`` the backbone is exported next to the logs and a summary is
printed. ``export`` writes a checkpoint's backbone for timm; ``evaluate`` runs the offline protocols
(``ssl_modules.evaluation``). Exit codes: 0 success, 1 a failed run (non-finite loss, failed probe, bad
file), 2 a bad command line. What each bad input gets is listed in ``docs/failures.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import importlib
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

__all__ = ["SSLCLI", "main", "export_checkpoint", "export_from_checkpoint", "probe_report", "did_you_mean", "run_cli",
           "CommandLineError", "RunError", "did_you_mean_class", "resume_command", "failure_message"]

_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2  # and 128 + N: stopped by signal N (docs/failures.md)
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")

HELP = """\
usage: python -m ssl_modules <command> [options]   (or: ssl-modules <command> ...)

Self-supervised pretraining of dense features (CrIBo, BAM, VICRegL) with Lightning.

commands:
  fit        train: python -m ssl_modules fit --config examples/configs/quickstart.yaml
             (resume: add --ckpt_path last; the backbone is exported to <run>/backbone.pt at the end)
  validate   run the config's probes on a checkpoint: ... validate --config <yaml> --ckpt_path <ckpt>
  test       Lightning's test loop
  predict    Lightning's predict loop
  export     write a checkpoint's backbone as timm weights: ... export <ckpt> <out.pt>
  evaluate   offline evaluation protocols (k-NN, linear, segmentation, retrieval) on a checkpoint

"python -m ssl_modules <command> --help" lists a command's options.
Exit codes: 0 success, 1 failed run or unreadable input, 2 bad command line, 128 + N stopped by signal N
(143: SIGTERM) with a checkpoint to resume from (docs/failures.md, docs/resume.md).
"""


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
                self.progress = _progress_class()()
                self.trainer.callbacks.append(self.progress)
                if self.trainer.is_global_zero and _is_rank_zero():
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
            if path and str(path) not in _CKPT_KEYWORDS:
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
            if not self.trainer.is_global_zero:
                return
            self.exported = self.model.export_backbone(run_dir / "backbone.pt")
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


def _progress_class() -> type:
    """``RunProgress``, a Lightning callback defined on first use (``--help`` imports no Lightning) under its
    module-level name, so that it pickles (``ddp_spawn``)."""
    built = globals().get("RunProgress")
    if isinstance(built, type):
        return built
    from lightning.pytorch import Callback

    class _RunProgress(Callback):
        """What this ``fit`` trained: the step it started at (after a resume), the batches it trained and the
        training loop's wall time. It holds no state of the run (nothing in checkpoints, no randomness)."""

        def __init__(self) -> None:
            self.start_step: int | None = None
            self.batches = 0
            self.loop_seconds: float | None = None
            self._loop_started: float | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start_step = trainer.global_step
            self._loop_started = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.batches += 1

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self._loop_started is not None:
                self.loop_seconds = time.perf_counter() - self._loop_started

        def trained_steps(self, trainer: Any) -> int:
            """Optimizer steps taken by this run (0 when it resumed a run already at its end)."""
            return trainer.global_step - self.start_step if self.start_step is not None else 0

    _RunProgress.__name__ = _RunProgress.__qualname__ = "RunProgress"
    globals()["RunProgress"] = _RunProgress
    return _RunProgress


def __getattr__(name: str) -> Any:
    if name == "SSLCLI":
        return _cli_class()
    if name == "RunProgress":
        return _progress_class()
    raise AttributeError(f"module 'ssl_modules.cli.app' has no attribute {name!r}")



# ---------------------------------------------------------------------------------- before the run
class RunError(RuntimeError):
    """A run that cannot go on (exit code 1), already worded for the user: what is wrong and how to fix it."""


def check_trains_something(section: Any) -> None:
    """A :class:`CommandLineError` for ``fit`` with ``max_epochs 0`` or ``max_steps 0``: such a run trains
    nothing and would export the random initial backbone as if it were trained."""
    trainer = (section.get("trainer") if section is not None else None) or {}
    for name in ("max_epochs", "max_steps"):
        if trainer.get(name) == 0:
            raise CommandLineError(
                f"error: --trainer.{name} 0 trains nothing: fit would export the random initial backbone as if it "
                f"were trained. Give {name} >= 1 (or -1 with the other limit set); to write a checkpoint's "
                "backbone use: python -m ssl_modules export <ckpt> <out.pt>")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable_folder(folder: str | Path, what: str) -> None:
    """A :class:`RunError` unless ``folder`` can be created (if needed) and written by this process."""
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise RunError(f"{what} {folder} cannot be created: {existing} is a file, not a folder. Choose another "
                       f"folder for {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        relation = "is" if existing == folder.absolute() else f"would be created in {existing}, which is"
        raise RunError(f"{what} {folder} {relation} not writable by this user (permission denied). Choose a folder "
                       f"you can write to (e.g. {what} runs/<name>), or change its permissions")


def check_run_folders_writable(trainer: Any) -> None:
    """The folders the run will write (``default_root_dir``, the loggers', each ``ModelCheckpoint`` dirpath)
    are writable, checked before anything is built or trained (on every process: each writes its own files)."""
    folders = {str(trainer.default_root_dir): "--trainer.default_root_dir"}
    for logger in trainer.loggers:
        save_dir = getattr(logger, "save_dir", None)
        if save_dir:
            folders.setdefault(str(save_dir), f"the save_dir of {type(logger).__name__}")
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            folders.setdefault(str(dirpath), f"the dirpath of {type(callback).__name__}")
    for folder, what in folders.items():
        if "://" not in folder:  # remote file systems (s3://, gs://) are the user's to check
            check_writable_folder(folder, what)


def warn_more_processes_than_cores(trainer: Any) -> None:
    """A warning (stderr, rank zero) when a CPU run starts more processes than this process has cores."""
    from lightning.pytorch.accelerators import CPUAccelerator

    from ssl_modules.cli.evaluate import usable_cpus

    processes, cores = trainer.num_devices, usable_cpus()
    if isinstance(trainer.accelerator, CPUAccelerator) and processes > cores and _is_rank_zero():
        print(f"warning: --trainer.devices {processes} starts {processes} training processes on the CPU, but this "
              f"process may use {cores} core{'s' if cores > 1 else ''}: they share the cores and the run is slower "
              f"than with --trainer.devices {cores}. Several CPU processes are for trying DDP code; train on "
              "GPUs (--trainer.accelerator gpu)", file=sys.stderr)


def _constructed_class(error: BaseException) -> type | None:
    """The class whose ``__init__`` raised ``error`` (the outermost constructor in its traceback), or None."""
    frame_tb = error.__traceback__
    while frame_tb is not None:
        frame = frame_tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"])
        frame_tb = frame_tb.tb_next
    return None


def _refused(error: BaseException) -> tuple[type, BaseException] | None:
    """The constructor that refused its arguments behind ``error`` (following the chain of causes, as
    jsonargparse wraps a constructor's error in its union error), and its own exception."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        owner = _constructed_class(current)
        if owner is not None and isinstance(current, (ValueError, MisconfigurationException)):
            return owner, current
        current = current.__cause__ or current.__context__
    return None


def _section_of(owner: type) -> str | None:
    """The option of the command line that configures instances of ``owner``."""
    from lightning.pytorch import Callback, LightningDataModule, Trainer

    from ssl_modules.methods.base import SSLModule

    for base, option in ((SSLModule, "--model"), (LightningDataModule, "--data"), (Callback, "--trainer.callbacks"),
                         (Trainer, "--trainer")):
        if issubclass(owner, base):
            return option
    return None


def _given_arguments(argv: list[str], option: str) -> list[str]:
    """The arguments of ``argv`` under ``option`` (``--model`` -> ``--model.init_args.lr 0.1``), with values."""
    given: list[str] = []
    for position, token in enumerate(argv):
        name = token.split("=", 1)[0].rstrip("+")
        if name != option and not name.startswith(option + "."):
            continue
        if option == "--trainer" and name.startswith("--trainer.callbacks"):
            continue
        given.append(token)
        following = argv[position + 1] if position + 1 < len(argv) else None
        if "=" not in token and following is not None and not following.startswith("--"):
            given.append(following)
    return given


def refused_arguments(error: BaseException, argv: list[str], subcommand: str) -> str | None:
    """A short message when ``error`` is a constructor refusing the arguments the config and command line gave
    it (the class, its own message, the arguments given for it), or None for any other error."""
    import shlex

    refused = _refused(error)
    if refused is None:
        return None
    owner, cause = refused
    option = _section_of(owner)
    label = f"{owner.__qualname__} ({option})" if option else owner.__qualname__
    given = _given_arguments(argv, option) if option else []
    configs = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--config"]
    source = f"given: {shlex.join(given)}" if given else f"from the config {' '.join(configs)}" if configs else ""
    lines = [f"error: {label} refused its arguments: {cause}"]
    if source:
        lines.append(f"  {source}")
    lines.append(f"(python -m ssl_modules {subcommand} --help lists the options)")
    return "\n".join(lines)


class FailedRunFolder:
    """The folder a ``fit`` writes its logs to, remembered before the run so that a run failing before its first
    step removes it again: only when the run created it and nothing in it is a checkpoint."""

    def __init__(self, folder: Path, existed: bool, anchor: Path) -> None:
        self.folder, self.existed, self.anchor = folder, existed, anchor

    @classmethod
    def plan(cls, trainer: Any) -> FailedRunFolder | None:
        """The run folder of ``trainer`` (no collective call), or None for a logger whose folder is shared."""
        folder = _planned_run_folder(trainer)
        if folder is None:
            return None
        folder = folder.absolute()
        return cls(folder, folder.exists(), _nearest_existing(folder))

    def remove(self) -> bool:
        """Remove the folder (and the empty parents the run created) if the run created it and it holds no
        checkpoint; returns whether it did."""
        import shutil

        if self.existed or not self.folder.is_dir() or any(self.folder.rglob("*.ckpt")):
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        for parent in self.folder.parents:
            if parent == self.anchor or self.anchor not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()
        return not self.folder.exists()


def trains_in_this_process(trainer: Any) -> bool:
    """Whether ``fit`` trains in this process (rank 0 of ``ddp`` does), not in processes it spawns
    (``ddp_spawn``, ``ddp_fork``), whose progress this process never sees."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def _planned_run_folder(trainer: Any) -> Path | None:
    """Where ``trainer.log_dir`` will be, computed without its broadcast (the processes are not started yet)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (TensorBoardLogger, CSVLogger)) and "://" not in str(logger.log_dir):
        return Path(logger.log_dir)
    return None


# ------------------------------------------------------------------------------------------- summary
def collect_failures(callbacks: list) -> list[str]:
    """The ``failures`` messages of the optional parts (probes, diagnostics) that failed during the run."""
    found: list[str] = []
    for callback in callbacks:
        found.extend(str(f) for f in (getattr(callback, "failures", None) or []))
    return found


def probe_report(callbacks: list) -> list[str]:
    """One line per probe metric: ``probe/<name>_<metric>  value`` (and the trivial floor where known)."""
    lines = []
    for callback in callbacks:
        metrics = getattr(callback, "last_metrics", None)
        if not isinstance(metrics, dict) or not hasattr(callback, "metric_name"):
            continue
        floors = getattr(callback, "last_floors", None) or {}
        for metric, value in metrics.items():
            floor = floors.get(metric)
            beside = f"   (trivial floor {float(floor):.4f})" if floor is not None else ""
            lines.append(f"  {callback.metric_name(metric):<28} {float(value):.4f}{beside}")
    return lines


def _exact_resume(trainer: Any) -> Any:
    from ssl_modules.run.resume import ExactResume

    return next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, ExactResume)), None)


def stop_signal(trainer: Any) -> int | None:
    """The signal (SIGTERM, SLURM's requeue signal) on which the fit stopped before its end, or None."""
    resume = _exact_resume(trainer)
    return getattr(resume, "stop_signal", None)


def _stop_line(trainer: Any) -> str:
    """``Run finished.``, or why and where it stopped before the end of its schedule."""
    resume = _exact_resume(trainer)
    reason = getattr(resume, "stopped_by", None)
    total = getattr(trainer, "max_steps", -1)
    try:
        total = int(trainer.estimated_stepping_batches)
    except Exception:  # no training loader (validate), or an infinite one
        pass
    if reason is None or (total > 0 and trainer.global_step >= total):
        return "Run finished."
    why = "max_time or a callback" if reason == "should_stop" else reason
    return f"Run STOPPED at step {trainer.global_step} of {total} ({why}): resume it to reach the end."


def _final_losses(trainer: Any) -> list[str]:
    metrics = trainer.callback_metrics
    return [f"{k.removeprefix('train/')}={float(v):.4g}" for k, v in sorted(metrics.items()) if k.startswith("train/")]


def fit_summary(trainer: Any, model: Any, datamodule: Any, run_dir: Path, backbone: Path,
                seconds: float | None, failures: list[str], config: Any = None, progress: Any = None,
                argv: list[str] | None = None) -> list[str]:
    """The end-of-fit summary lines (printed on rank zero). ``progress`` (a ``RunProgress``) says what this run
    trained, so that a resumed run reports its own steps; ``argv`` is the command line, for the resume command
    when the run saved no ``config.yaml``."""
    resumed_from = _resumed_from(config)
    trained = progress.trained_steps(trainer) if progress is not None else None
    ckpt = run_checkpoint(trainer, resumed_from if not trained else None)
    status = _stop_line(trainer)
    lines = ["", status if not failures else f"{status[:-1]}, and optional parts FAILED (see below).",
             f"  logs:        {run_dir}  (tensorboard --logdir {run_dir.parent})",
             f"  checkpoint:  {ckpt or 'none (checkpointing is off)'}",
             f"  backbone:    {backbone}  (timm weights; name and kwargs in {backbone.with_suffix('.json').name})",
             steps_line(trainer, datamodule, progress, seconds, finished=status == "Run finished.")]
    losses = _final_losses(trainer)
    if losses:
        lines.append("  final:       " + ", ".join(losses))
    probes = probe_report(trainer.callbacks)
    if probes:
        lines += ["  probes (last evaluation):", *probes]
    lines += [f"  FAILED: {failure}" for failure in failures]
    lines += [f"  resume:      {resume_command(run_dir, ckpt, argv if argv is not None else sys.argv[1:])}",
              f"  evaluate:    python -m ssl_modules evaluate --help  (checkpoint {ckpt or backbone})"]
    if status == "Run finished." and ckpt:
        lines[-2] += "  (trains on only with a larger --trainer.max_epochs or max_steps)"
    return lines


def steps_line(trainer: Any, datamodule: Any, progress: Any, seconds: float | None, finished: bool) -> str:
    """``steps: N in T s, R images/s`` for the steps this run trained, never the checkpoint's (a resumed run
    says where it started; one that trained nothing says so)."""
    total = trainer.global_step
    if progress is None:  # ddp_spawn: the steps were counted in the spawned processes
        return "  steps:       trained in spawned processes (ddp_spawn): their steps and speed are in the logs"
    trained = progress.trained_steps(trainer)
    start = total - trained
    if not trained:
        where = f": it resumed at step {start}" if start else ""
        end = " (the end of its schedule)" if finished and start else ""
        return f"  steps:       none trained in this run{where}{end}"
    line = f"  steps:       {trained} in {seconds:.1f} s" if seconds else f"  steps:       {trained}"
    if start:
        line += f" (resumed at step {start}, now at step {total})"
    batch = getattr(datamodule, "batch_size", None)
    loop = progress.loop_seconds or seconds
    if loop and batch:
        images = trained * batch * trainer.world_size * max(trainer.accumulate_grad_batches, 1)
        line += f", {images / loop:.1f} images/s"
    return line


def run_checkpoint(trainer: Any, resumed_from: str | None = None) -> str | None:
    """The newest checkpoint of this run: its stop checkpoint or the newest file its checkpoint callbacks wrote
    (or restored from the run it resumes); else ``resumed_from`` when given (a resumed run that trained
    nothing is still at that checkpoint); else None."""
    candidates = [getattr(_exact_resume(trainer), "stop_path", None)]
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        candidates += [getattr(callback, name, None)
                       for name in ("_last_checkpoint_saved", "last_model_path", "best_model_path")]
    files = [Path(c) for c in candidates if c and Path(c).is_file()]
    if files:
        return str(max(files, key=lambda path: path.stat().st_mtime_ns))
    return resumed_from if resumed_from and Path(resumed_from).is_file() else None


def resume_command(run_dir: Path, checkpoint: str | None, argv: list[str]) -> str:
    """The command that resumes this run and no other: ``fit --config <run>/config.yaml`` (Lightning saves
    every override of the run in it) or, without it, the run's own command line, with ``--ckpt_path`` the
    run's newest checkpoint."""
    import shlex

    if checkpoint is None:
        return ("not possible: this run saved no checkpoint (turn checkpointing on: trainer.enable_checkpointing "
                "true, or a ModelCheckpoint callback)")
    saved = Path(run_dir) / "config.yaml"
    if saved.is_file():
        arguments = ["--config", str(saved)]
    else:
        arguments = _without_ckpt_path(argv[1:] if argv and argv[0] == "fit" else argv)
    return "python -m ssl_modules fit " + shlex.join([*arguments, "--ckpt_path", str(checkpoint)])


def _without_ckpt_path(arguments: list[str]) -> list[str]:
    """``arguments`` without ``--ckpt_path X`` / ``--ckpt_path=X``."""
    kept: list[str] = []
    skip = False
    for token in arguments:
        if skip:
            skip = False
        elif token == "--ckpt_path":
            skip = True
        elif not token.startswith("--ckpt_path="):
            kept.append(token)
    return kept


def _resumed_from(config: Any) -> str | None:
    """The checkpoint ``fit`` resumed from (``last`` already resolved), or None."""
    try:
        path = config[config["subcommand"]]["ckpt_path"]
    except (KeyError, TypeError):
        return None
    return str(path) if path and str(path) not in _CKPT_KEYWORDS else None


# ------------------------------------------------------------------------------------------- export
def export_checkpoint(checkpoint: str | Path, output: str | Path, trust_checkpoint: bool = False) -> Path:
    """Load a Lightning checkpoint of any ``SSLModule`` and write its backbone for timm.

    When the module's class cannot be imported (a user's subclass in a script), the backbone is taken from
    what the checkpoint records (``export_from_checkpoint``).
    """
    from ssl_modules.checkpoints.reading import load_module, read_checkpoint, recorded_class

    # the trust rule: docs/resume.md; memory-mapped, as load_module reads the file again
    data = read_checkpoint(checkpoint, trust_checkpoint=trust_checkpoint, mmap=True)
    try:
        recorded_class(data.get("ssl_module_class", ""))
    except (ImportError, AttributeError, ValueError):
        if "ssl_module_backbone" in data:
            return export_from_checkpoint(data, output)
    return load_module(checkpoint, trust_checkpoint=trust_checkpoint).export_backbone(output)


def export_from_checkpoint(checkpoint: dict[str, Any], output: str | Path) -> Path:
    """Write the backbone recorded in a loaded checkpoint (``ssl_module_backbone``) without its module class."""
    import torch

    from ssl_modules.run.guard import NonFiniteLossError

    info = checkpoint["ssl_module_backbone"]
    prefix = info["state_prefix"]
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    reference = next(iter(state.values()))
    for key, channels in info.get("removed_layer_scale", {}).items():
        state[key] = torch.ones(channels, dtype=reference.dtype)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteLossError(f"non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): export to {output} refused")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, output)
    meta = {"name": info["name"], "model_kwargs": {**info["model_kwargs"], "num_classes": 0}}
    output.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str))
    return output


def _command_line_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """An ``argparse`` parser whose errors are one line and exit code 2 (``CommandLineParser``)."""
    from ssl_modules.cli.evaluate import CommandLineParser

    return CommandLineParser(**kwargs)


def parse_export_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | None:
    """``export``'s arguments, None after ``--help``; a :class:`CommandLineError` for a bad command line,
    an output that is a folder included (checked before the checkpoint is read)."""
    from ssl_modules.cli.evaluate import UsageError

    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        raise CommandLineError(f"error: {error}") from None
    except SystemExit as stop:
        if stop.code:
            raise
        return None
    check_export_output(args.output)
    return args


def check_export_output(output: str) -> None:
    """A :class:`CommandLineError` when ``output`` names a folder: export writes one file (and its .json)."""
    if Path(output).is_dir() or output.endswith(("/", os.sep)):
        raise CommandLineError(f"error: the output {output} is a folder: export writes one file (the state dict) and "
                               f"a .json beside it. Name the file, e.g. {Path(output) / 'backbone.pt'}")


def _export_main(argv: list[str]) -> int:
    parser = _command_line_parser(prog="python -m ssl_modules export",
                                  description="Write the (teacher) backbone of a checkpoint as timm weights.")
    parser.add_argument("checkpoint", help="Lightning checkpoint (.ckpt) of an SSLModule, or an official one "
                        "with --official")
    parser.add_argument("output", help="where to write the state dict (.pt); a .json with the timm name goes beside it")
    parser.add_argument("--official", choices=["auto", "cribo", "bam", "vicregl"], default=None,
                        help="the checkpoint is an official CrIBo / BAM / VICRegL training checkpoint (auto: detected "
                        "from its keys); its teacher backbone is written (docs/fidelity.md)")
    parser.add_argument("--backbone", default=None, help="with --official: the timm name, when the checkpoint's "
                        "shapes and args do not tell it")
    parser.add_argument("--backbone-kwargs", default=None, type=json.loads,
                        help='with --official: timm.create_model keyword arguments as JSON, e.g. \'{"depth": 2}\'')
    parser.add_argument("--trust-checkpoint", action="store_true", help="read the checkpoint with full unpickling "
                        "even if it holds types a weights-only read refuses (runs code from the file; docs/resume.md)")
    args = parse_export_arguments(parser, argv)
    if args is None:  # --help
        return EXIT_OK
    if args.official is not None:
        from ssl_modules.checkpoints.official import export_official

        method = None if args.official == "auto" else args.official
        given = {k: v for k, v in (("backbone", args.backbone), ("backbone_kwargs", args.backbone_kwargs)) if v}
        path = export_official(args.checkpoint, args.output, method, trust_checkpoint=args.trust_checkpoint, **given)
    else:
        path = export_checkpoint(args.checkpoint, args.output, args.trust_checkpoint)
    print(f"backbone written to {path} (timm name and kwargs in {path.with_suffix('.json')})")
    return 0


def _evaluate_main(argv: list[str]) -> int:
    try:
        evaluation = importlib.import_module("ssl_modules.cli.evaluate")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("ssl_modules.evaluation"):
            print("error: evaluate needs ssl_modules.evaluation, which this installation lacks", file=sys.stderr)
            return 1
        raise
    try:
        return int(evaluation.main(argv) or 0)
    except SystemExit as stop:  # --help
        if stop.code:
            raise
        return EXIT_OK


# ------------------------------------------------------------------------------------- bad arguments
def _init_parameters(cls: type) -> list[str]:
    """Every keyword a class's constructor accepts, following ``**kwargs`` into the base classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def did_you_mean(message: str) -> str | None:
    """A short message for an unknown constructor argument in a jsonargparse error, with the closest names."""
    option = re.search(r"Option '([^']+)' is not accepted|Key '([^']+)' is not expected"
                       r'|No action for key "([^"]+)"', message)  # the last: jsonargparse < 4.32
    owner = re.search(r"class_path '([^']+)'", message)
    if not option:
        return None
    name = next(group for group in option.groups() if group)
    name = name.rsplit(".", 1)[-1]
    candidates: list[str] = []
    label = "this class"
    if owner:
        label = owner.group(1)
        with contextlib.suppress(Exception):
            candidates = _init_parameters(_resolve_class(owner.group(1)))
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{label} has no argument {name!r}{hint}"


def _resolve_class(class_path: str) -> type:
    if "." in class_path:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    for package in ("ssl_modules", "datamodules", "callbacks"):
        with contextlib.suppress(AttributeError):
            return getattr(importlib.import_module(package), class_path)
    raise LookupError(class_path)


_UNKNOWN_CLASS = (r"Expected a dot import path string: (\S+)", r"Expected a path but (\S+) either not accessible",
                  r"Problem with given class_path '([^']+)':\s*(?:module '[^']*' has no attribute|No module named)",
                  r"module '[\w.]+' has no attribute '(\w+)'")  # the wordings of jsonargparse 4.27 to 4.53


def did_you_mean_class(message: str) -> str | None:
    """A short message for a class path that names no class in a jsonargparse error (``--model VicRegL``,
    ``--trainer.callbacks+=KnnProbe``), with the closest class names the option accepts."""
    given = next((m.group(1) for pattern in _UNKNOWN_CLASS if (m := re.search(pattern, message))), None)
    if given is None:
        return None
    key = re.search(r'Parser key "([^"]+)"', message)
    where = f" for --{key.group(1)}" if key else ""
    classes = _accepted_classes(message)
    close = _closest_names(given.rpartition(".")[2], [cls.__name__ for cls in classes])
    if close:
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?"
    else:
        ours = sorted(cls.__name__ for cls in classes if cls.__module__.partition(".")[0] in _PACKAGES)
        hint = (f"the library's are {', '.join(ours)}; " if ours else "") + \
            "a class of your own needs its import path, e.g. my_package.MyClass, importable from the current folder"
    return f"no class {given!r}{where}: {hint}"


_PACKAGES = ("ssl_modules", "datamodules", "callbacks")


def _closest_names(wanted: str, names: list[str]) -> list[str]:
    """The names closest to ``wanted``, ignoring case: the one that differs only in case, else up to three
    about as close as the closest."""
    by_lower = {name.lower(): name for name in names}
    if wanted.lower() in by_lower:
        return [by_lower[wanted.lower()]]
    scored = sorted(((difflib.SequenceMatcher(None, wanted.lower(), lower).ratio(), name)
                     for lower, name in by_lower.items()), reverse=True)
    best = scored[0][0] if scored else 0.0
    return [name for ratio, name in scored[:3] if ratio >= max(0.6, best - 0.05)]


def _accepted_classes(message: str) -> list[type]:
    """The public classes a jsonargparse union error says the option accepts (``Subtypes: [...]``): every
    imported subclass of each (LightningCLI resolves them by their short name), the bases themselves excluded."""
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    if not subtypes:
        return []
    found: list[type] = []
    for dotted in dict.fromkeys(re.findall(r"([A-Za-z_][\w.]*\.[A-Z]\w*)", subtypes.group(1))):
        with contextlib.suppress(Exception):
            base = _resolve_class(dotted)
            found += [cls for cls in _subclasses(base)[1:] if not cls.__name__.startswith("_") and cls not in found]
    return found


def _subclasses(base: type) -> list[type]:
    """``base`` and every subclass of it imported so far."""
    found, queue = [], [base]
    while queue:
        cls = queue.pop(0)
        if cls not in found:
            found.append(cls)
            queue.extend(cls.__subclasses__())
    return found


def _short_argument_error(error: Exception, subcommand: str) -> str:
    message = str(error)
    hint = did_you_mean(message) or did_you_mean_class(message)
    tail = f"(python -m ssl_modules {subcommand} --help lists the options)"
    if hint:
        return f"error: {hint} {tail}"
    lines = [line for line in message.splitlines() if line.strip()][:8]
    return "error: " + "\n  ".join(lines) + f"\n{tail}"


# ------------------------------------------------------------------------------------------- main
class CommandLineError(ValueError):
    """A bad command line (unknown option, wrong type, ...), already shortened for the user."""


def run_cli(argv: list[str]) -> LightningCLI:
    """Run a Lightning subcommand (``fit``, ``validate``, ...) and return the ``SSLCLI`` (for tests and scripts).

    Raises :class:`CommandLineError` for a bad command line; ``main`` turns it into exit code 2.
    """
    import torch
    from jsonargparse import ArgumentError
    from lightning.pytorch import LightningDataModule

    import callbacks  # noqa: F401  (registers the probes for short class names)
    import datamodules  # noqa: F401

    from ssl_modules.methods.base import SSLModule

    _import_methods()
    torch.set_float32_matmul_precision("high")
    quiet_lightning()
    subcommand = argv[0] if argv else "fit"
    try:
        with _as_argv(argv):
            return _cli_class()(SSLModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                                save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                                parser_kwargs={"exit_on_error": False})
    except ArgumentError as error:
        raise CommandLineError(_short_argument_error(error, subcommand)) from None


def _is_rank_zero() -> bool:
    import os

    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def main(args: list[str] | None = None) -> int:
    """Entry point of ``python -m ssl_modules`` and the ``ssl-modules`` script; returns the exit code: 0 success,
    1 a failed run (bad data, checkpoint or file, non-finite loss, failed optional part), 2 a bad command line,
    128 + N stopped by signal N (``docs/failures.md``). Every error the user can fix is one short message."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return EXIT_OK if argv else EXIT_USAGE
    try:
        return _run_command(argv)
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


def _run_command(argv: list[str]) -> int:
    """Run the command ``argv[0]``; its exit code (errors propagate to ``main``)."""
    if argv[0] == "export":
        return _export_main(argv[1:])
    if argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    if argv[0] not in _LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], [*_LIGHTNING_SUBCOMMANDS, "export", "evaluate"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CommandLineError(f"error: unknown command {argv[0]!r}{hint}\n\n{HELP}")
    cli = run_cli(argv)
    signum = stop_signal(cli.trainer)
    if signum is not None:
        return 128 + signum  # what a shell reports for a process ended by that signal: the run is not done
    return EXIT_FAILED if getattr(cli, "failures", None) else EXIT_OK


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def failure_message(error: BaseException) -> str | None:
    """The one message for a run that failed on something the user can fix (exit code 1): the library's own
    errors (bad data or checkpoint, non-finite loss, a check of an argument during the run) and a file that
    cannot be written; ``""`` where another process prints it; None for anything else (a bug: its traceback
    is shown)."""
    from ssl_modules.checkpoints.reading import CheckpointFileError
    from ssl_modules.run.guard import NonFiniteLossError

    if isinstance(error, NonFiniteLossError):
        return f"error: {error}" if _is_rank_zero() else ""  # every process stops together; one message
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
    roots = [Path(importlib.import_module(name).__file__ or "").resolve().parent for name in _PACKAGES]
    return any(root in raised_in.parents for root in roots)
