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
import importlib
import inspect
import json
import logging
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
           "CommandLineError"]

_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
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
        importlib.import_module(f"ssl_modules.{name}")


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

        def before_fit(self) -> None:
            self._fit_started = time.perf_counter()

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
            (``ssl_modules.resume.prepare_resume``; Lightning's own parse would silently apply the checkpoint's)."""
            from lightning.pytorch.utilities import rank_zero_only

            from ssl_modules.resume import prepare_resume

            self._check_ckpt_path()
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
            from .checkpoint_io import check_checkpoint_file

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
                                        seconds, self.failures, self.config)))

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
    raise AttributeError(f"module 'ssl_modules.cli' has no attribute {name!r}")



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
    from .resume import ExactResume

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
                seconds: float | None, failures: list[str], config: Any = None) -> list[str]:
    """The end-of-fit summary lines (printed on rank zero)."""
    checkpoints = trainer.checkpoint_callback
    ckpt = (getattr(_exact_resume(trainer), "stop_path", None) or getattr(checkpoints, "last_model_path", "")
            or getattr(checkpoints, "best_model_path", ""))
    steps = trainer.global_step
    status = _stop_line(trainer)
    lines = ["", status if not failures else f"{status[:-1]}, and optional parts FAILED (see below).",
             f"  logs:        {run_dir}  (tensorboard --logdir {run_dir.parent})",
             f"  checkpoint:  {ckpt or 'none (checkpointing is off)'}",
             f"  backbone:    {backbone}  (timm weights; name and kwargs in {backbone.with_suffix('.json').name})"]
    timing = f"  steps:       {steps} in {seconds:.1f} s" if seconds else f"  steps:       {steps}"
    batch = getattr(datamodule, "batch_size", None)
    if seconds and batch and steps:
        images = steps * batch * trainer.world_size * max(trainer.accumulate_grad_batches, 1)
        timing += f", {images / seconds:.1f} images/s"
    lines.append(timing)
    losses = _final_losses(trainer)
    if losses:
        lines.append("  final:       " + ", ".join(losses))
    probes = probe_report(trainer.callbacks)
    if probes:
        lines += ["  probes (last evaluation):", *probes]
    lines += [f"  FAILED: {failure}" for failure in failures]
    config_file = _config_file(config)
    again = f"--config {config_file} " if config_file else ""
    lines += [f"  resume:      python -m ssl_modules fit {again}--ckpt_path last",
              f"  evaluate:    python -m ssl_modules evaluate --help  (checkpoint {ckpt or backbone})"]
    return lines


def _config_file(config: Any) -> str | None:
    try:
        paths = config[config["subcommand"]]["config"]
        return str(paths[0]) if paths else None
    except (KeyError, TypeError, IndexError):
        return None


# ------------------------------------------------------------------------------------------- export
def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Load a Lightning checkpoint of any ``SSLModule`` and write its backbone for timm.

    When the module's class cannot be imported (a user's subclass in a script), the backbone is taken from
    what the checkpoint records (``export_from_checkpoint``).
    """
    from .base import SSLModule
    from .checkpoint_io import read_checkpoint

    data = read_checkpoint(checkpoint)
    class_path = data.get("ssl_module_class", "")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        if "ssl_module_backbone" in data:
            return export_from_checkpoint(data, output)
    return SSLModule.load_any(checkpoint).export_backbone(output)


def export_from_checkpoint(checkpoint: dict[str, Any], output: str | Path) -> Path:
    """Write the backbone recorded in a loaded checkpoint (``ssl_module_backbone``) without its module class."""
    import torch

    from .guard import NonFiniteLossError

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


def _export_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_modules export",
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
    args = parser.parse_args(argv)
    if args.official is not None:
        from .official import export_official

        method = None if args.official == "auto" else args.official
        given = {k: v for k, v in (("backbone", args.backbone), ("backbone_kwargs", args.backbone_kwargs)) if v}
        path = export_official(args.checkpoint, args.output, method, **given)
    else:
        path = export_checkpoint(args.checkpoint, args.output)
    print(f"backbone written to {path} (timm name and kwargs in {path.with_suffix('.json')})")
    return 0


def _evaluate_main(argv: list[str]) -> int:
    try:
        evaluation = importlib.import_module("ssl_modules.evaluation.cli")
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("ssl_modules.evaluation"):
            print("error: evaluate needs ssl_modules.evaluation, which this installation lacks", file=sys.stderr)
            return 1
        raise
    return int(evaluation.main(argv) or 0)


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


def _short_argument_error(error: Exception, subcommand: str) -> str:
    message = str(error)
    hint = did_you_mean(message)
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

    from .base import SSLModule

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
    """Entry point of ``python -m ssl_modules`` and the ``ssl-modules`` script; returns the exit code."""
    from .checkpoint_io import CheckpointFileError

    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    try:
        if argv[0] == "export":
            return _export_main(argv[1:])
        if argv[0] == "evaluate":
            return _evaluate_main(argv[1:])
        if argv[0] not in _LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
            close = difflib.get_close_matches(argv[0], [*_LIGHTNING_SUBCOMMANDS, "export", "evaluate"], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            print(f"error: unknown command {argv[0]!r}{hint}\n\n{HELP}", file=sys.stderr)
            return 2
        cli = run_cli(argv)
    except CommandLineError as error:
        print(error, file=sys.stderr)
        return 2
    except CheckpointFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        from .guard import NonFiniteLossError

        if isinstance(error, NonFiniteLossError):
            if _is_rank_zero():  # every process stops together; one message
                print(f"error: {error}", file=sys.stderr)
            return 1
        raise
    signum = stop_signal(cli.trainer)
    if signum is not None:
        return 128 + signum  # what a shell reports for a process ended by that signal: the run is not done
    return 1 if getattr(cli, "failures", None) else 0
