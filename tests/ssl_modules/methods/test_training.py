"""Convergence of the tiny CPU configs ``examples/configs/<method>/synthetic_tiny.yaml``.

Each test trains its config through the command line entry point (``ssl_modules.cli.main``, in-process), on
the built-in synthetic scenes (generated once into a temporary folder), and checks what the method's
training should show in its 320 steps: the loss falls and the representation does not collapse (a
per-dimension std on a fixed batch, probed before the first step and after every epoch), plus BAM's
sharpening attention and CrIBo's cycle-consistent matches. Only logging, checkpointing and where files go
are overridden: the config itself is what is tested.

The thresholds come from measured runs with a clear margin; runs with learning rate 0, with a backbone that
gives every image the same features, with BAM's colour-jittered paper crops or with a CrIBo bank that never
receives real objects trip them. One torch thread: on a 2-core machine shared with other jobs, two threads
made these tiny steps about 4x slower (the loader worker runs in its own process).
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from ssl_modules.cli import main
from ssl_modules.cli.lightning import SSLCLI

CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "configs"


class TrainingRecord(Callback):
    """Every step's logged ``train/*`` values and epoch, and ``probe(module, batch)`` on the first training
    batch before the first step and after every epoch (in eval mode, without gradients)."""

    def __init__(self, probe: Callable[..., float]) -> None:
        self.probe, self.batch = probe, None
        self.steps: list[dict[str, float]] = []
        self.epochs: list[int] = []
        self.probes: list[float] = []

    def _probe(self, module) -> None:
        with torch.no_grad(), module.evaluating():
            self.probes.append(float(self.probe(module, self.batch)))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.batch is None:
            self.batch = batch
            self._probe(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.epochs.append(trainer.current_epoch)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._probe(module)

    def series(self, key: str) -> torch.Tensor:
        return torch.tensor([step[key] for step in self.steps])

    def probe_summary(self) -> str:
        return f"{self.probes[0]:.3f} -> {self.probes[-1]:.3f} (lowest {min(self.probes):.3f})"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One cache of synthetic scenes for the three configs (they ask for the same scenes)."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def one_thread():
    """One torch thread for the test; the thread count and the matmul precision (which ``main`` sets) are
    restored afterwards."""
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision(precision)


def train(method: str, probe, data_root: Path, tmp_path: Path, monkeypatch, *overrides: str) -> TrainingRecord:
    """Fit ``examples/configs/<method>/synthetic_tiny.yaml`` with the CLI and record it."""
    record = TrainingRecord(probe)
    monkeypatch.setattr(SSLCLI, "before_fit", lambda cli: cli.trainer.callbacks.append(record), raising=False)
    monkeypatch.setattr(sys, "argv", ["ssl_modules"])
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything sets it: removed again after the test
    main([
        "fit", "--config", str(CONFIGS / method / "synthetic_tiny.yaml"),
        f"--data.init_args.root={data_root}", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *overrides,
    ])
    assert record.steps, "no training step ran"
    return record


def per_dimension_std(x: torch.Tensor) -> float:
    """Mean over dimensions of the standard deviation over the batch."""
    return x.float().std(dim=0).mean().item()


# --------------------------------------------------------------------------------------------- VICRegL
def vicregl_global_embedding_std(module, views) -> float:
    """Per-dimension std of the expander's embeddings of the first global crop (what VICReg's variance
    term keeps above 1; a collapsed network gives 0)."""
    return per_dimension_std(module.expander(module(views.crops[0]).global_))


@pytest.mark.slow
def test_vicregl_tiny_config_learns_without_collapse(data_root, tmp_path, monkeypatch, one_thread):
    record = train("vicregl", vicregl_global_embedding_std, data_root, tmp_path, monkeypatch)
    loss = record.series("train/loss")
    early, late = loss[:10].mean().item(), loss[-30:].mean().item()
    print(f"\nVICRegL: {len(loss)} steps, loss {early:.2f} -> {late:.2f}, embedding std {record.probe_summary()}")
    assert late < 0.85 * early, f"the VICRegL loss did not fall: {early:.2f} -> {late:.2f}"
    assert record.probes[-1] > 0.3, (  # VICReg's variance term raises it from the initial ~0.2 towards 1
        f"the global embeddings collapsed: per-dimension std {record.probe_summary()} (floor 0.3 at the end)"
    )


# ------------------------------------------------------------------------------------------------- BAM
def bam_teacher_embedding_std(module, views) -> float:
    """Per-dimension std of the teacher's l2-normalised projector outputs of the first global crop, in
    units of ``1 / sqrt(D)`` (what unit vectors spread evenly over D dimensions give; collapse gives 0)."""
    z = module.project(module.teacher["backbone"], module.teacher["projector"], views.crops[:1])[0]
    return per_dimension_std(F.normalize(z, dim=-1)) * math.sqrt(z.shape[-1])


@pytest.mark.slow
def test_bam_tiny_config_sharpens_its_attention_without_collapse(data_root, tmp_path, monkeypatch, one_thread):
    record = train("bam", bam_teacher_embedding_std, data_root, tmp_path, monkeypatch)
    loss, entropy = record.series("train/loss"), record.series("train/attention_entropy")
    early_loss, late_loss = loss[:10].mean().item(), loss[-30:].mean().item()
    early_entropy, late_entropy = entropy[:10].mean().item(), entropy[-30:].mean().item()
    print(f"\nBAM: {len(loss)} steps, loss {early_loss:.3f} -> {late_loss:.3f}, attention entropy "
          f"{early_entropy:.3f} -> {late_entropy:.3f}, embedding std x sqrt(D) {record.probe_summary()}")
    assert late_loss < early_loss - 0.2, f"the BAM loss did not fall: {early_loss:.3f} -> {late_loss:.3f}"
    assert late_entropy < early_entropy - 0.25, (
        f"the attention did not sharpen: entropy {early_entropy:.3f} -> {late_entropy:.3f} nats"
    )
    assert min(record.probes) > 0.25, (
        f"the embeddings collapsed: per-dimension std x sqrt(D) {record.probe_summary()} (floor 0.25)"
    )


# ----------------------------------------------------------------------------------------------- CrIBo
def cribo_teacher_feature_std(module, views) -> float:
    """Per-dimension std of the teacher backbone's l2-normalised global (CLS) features of the first crop,
    in units of ``1 / sqrt(C)`` (collapse gives 0)."""
    features = module.embed(views.crops[0]).global_
    return per_dimension_std(F.normalize(features, dim=-1)) * math.sqrt(features.shape[-1])


@pytest.mark.slow
def test_cribo_tiny_config_learns_and_finds_cycle_consistent_matches(data_root, tmp_path, monkeypatch, one_thread):
    record = train("cribo", cribo_teacher_feature_std, data_root, tmp_path, monkeypatch)
    loss, objects = record.series("train/loss"), record.series("train/object_loss")
    cycles, cross = record.series("train/cycle_consistent_ratio"), record.series("train/cross_image_loss")
    start = record.epochs.index(1)  # the first step of the cross-image loss (cross_image_start_epoch: 1)
    assert (cross[:start] == 0).all() and (cross[start:] > 0).any(), "the cross-image loss must start at epoch 1"
    early_loss, late_loss = loss[start:start + 10].mean().item(), loss[-30:].mean().item()
    early_objects, late_objects = objects[:10].mean().item(), objects[-30:].mean().item()
    first_ratio, late_ratio = cycles[0].item(), cycles[-50:].mean().item()
    print(f"\nCrIBo: {len(loss)} steps, cross-image loss from step {start}; loss (all three terms) "
          f"{early_loss:.2f} -> {late_loss:.2f}, object loss {early_objects:.2f} -> {late_objects:.2f}, "
          f"cycle-consistent ratio {first_ratio:.3f} -> {late_ratio:.3f}, "
          f"teacher feature std x sqrt(C) {record.probe_summary()}")
    assert late_loss < early_loss - 0.8, f"the CrIBo loss did not fall: {early_loss:.2f} -> {late_loss:.2f}"
    assert late_objects < early_objects - 0.5, \
        f"the object loss did not fall: {early_objects:.2f} -> {late_objects:.2f}"
    assert first_ratio < 0.05, f"the random initial bank gave {first_ratio:.3f} cycle-consistent matches, not chance"
    assert late_ratio > 0.15, f"too few cycle-consistent matches: {late_ratio:.3f} of the objects (floor 0.15)"
    assert min(record.probes) > 0.4, (
        f"the teacher features collapsed: per-dimension std x sqrt(C) {record.probe_summary()} (floor 0.4)"
    )
