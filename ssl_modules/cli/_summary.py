"""What a ``fit`` or ``validate`` prints at its end: the run summary (where everything is, what this run trained,
the probes, the failures, the command that resumes it) and the ``RunProgress`` callback that counts what it trained."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["CKPT_KEYWORDS", "progress_class", "collect_failures", "probe_report", "stop_signal", "fit_summary",
           "steps_line", "run_checkpoint", "resume_command"]

CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # --ckpt_path values that name no file


def progress_class() -> type:
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
    if name == "RunProgress":  # unpickled in a fresh process (ddp_spawn)
        return progress_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
             *_timm_folder_line(backbone),
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


def _timm_folder_line(backbone: Path) -> list[str]:
    """The line of the folder export beside ``backbone.pt`` (``<run>/backbone/``), where there is one."""
    folder = backbone.with_suffix("")
    if not (folder / "config.json").is_file():
        return []
    return [f"  timm folder: {folder}  (timm.create_model('local-dir:{folder}', pretrained=True) loads it)"]


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
    return str(path) if path and str(path) not in CKPT_KEYWORDS else None
