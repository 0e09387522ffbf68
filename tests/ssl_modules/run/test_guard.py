"""Non-finite guard: a NaN loss stops the run, names the step and terms, and nothing after it is written."""
from __future__ import annotations

import pytest
import torch
from support.cli_testkit import all_finite, checkpoints_by_step, run_cli, tiny_config

from ssl_modules.run.guard import NonFiniteGuard, NonFiniteLossError, check_finite_state

INJECT = [{"class_path": "support.cli_testkit.InjectNaN", "init_args": {"step": 5}}]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cribo", "vicregl"])
def test_nan_stops_the_run_with_a_message_and_keeps_the_last_finite_checkpoint(method, tmp_path):
    result = run_cli(["fit", "--config", str(tiny_config(tmp_path, method, steps=12, callbacks=INJECT))])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite loss at step 5" in result.stderr
    assert "train/loss=nan" in result.stderr
    assert "Traceback" not in result.stderr
    saved = checkpoints_by_step(tmp_path / "ckpts")
    assert [p.stem.split("step=")[1] for p in saved] == ["2", "4"]  # nothing from step 6 on
    assert all_finite(saved[-1])
    assert not list((tmp_path / "run").rglob("backbone.pt"))


@pytest.mark.slow
def test_vicregl_divergence_from_a_huge_learning_rate_is_stopped(tmp_path):
    config = tiny_config(tmp_path, "vicregl", steps=40, checkpoint_every=1, lr=1.0e4, warmup_epochs=0)
    result = run_cli(["fit", "--config", str(config)])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "non-finite" in result.stderr
    assert all_finite(checkpoints_by_step(tmp_path / "ckpts")[-1])
    assert not list((tmp_path / "run").rglob("backbone.pt"))


@pytest.mark.slow
def test_the_guard_can_be_turned_off(tmp_path):
    config = tiny_config(tmp_path, "vicregl", steps=8, callbacks=INJECT, checkpoint_every=None, nonfinite_guard=False)
    result = run_cli(["fit", "--config", str(config)])
    assert "non-finite loss" not in result.stderr
    assert "export" in result.stderr and "refused" in result.stderr  # the export still refuses NaN weights
    assert result.returncode == 1


def test_record_names_the_first_nonfinite_step_and_terms():
    guard = NonFiniteGuard()
    device = torch.device("cpu")
    guard.record({"train/loss": torch.tensor(1.0), "train/a": 2.0}, 0, device)
    guard.record({"train/loss": torch.tensor(float("nan")), "train/a": torch.tensor(float("inf"))}, 3, device)
    guard.record({"train/loss": torch.tensor(float("nan")), "train/a": torch.tensor(1.0)}, 4, device)
    message = guard.describe(3, 4)
    assert "step 3" in message and "train/loss=nan" in message and "train/a=inf" in message
    assert "nonfinite_guard false" in message


def test_export_refuses_nonfinite_weights(tmp_path):
    from support.common import TINY_VIT

    from ssl_modules.methods.base import SSLModule

    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    with torch.no_grad():
        next(module.backbone.parameters()).fill_(float("nan"))
    from ssl_modules.checkpoints.export import NonFiniteWeightsError

    with pytest.raises(NonFiniteWeightsError, match="export .* refused"):
        module.export_backbone(tmp_path / "backbone.pt")
    assert not (tmp_path / "backbone.pt").exists()
    with pytest.raises(NonFiniteLossError, match="backbone.model"):
        check_finite_state(module, "x")


@pytest.mark.slow
def test_under_ddp_a_nan_on_one_process_stops_every_process(tmp_path):
    inject = [{"class_path": "support.cli_testkit.InjectNaN", "init_args": {"step": 5, "rank": 1}}]
    config = tiny_config(tmp_path, "vicregl", steps=12, callbacks=inject)
    result = run_cli(["fit", "--config", str(config), "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                     timeout=300, as_module=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("non-finite loss at step 5") == 1
    saved = checkpoints_by_step(tmp_path / "ckpts")
    assert saved and all_finite(saved[-1]) and int(saved[-1].stem.split("step=")[1]) <= 4


def test_the_guard_is_attached_once_and_a_configured_one_is_kept():
    import lightning.pytorch as pl
    from support.common import TINY_VIT, quiet_trainer_kwargs

    from ssl_modules.methods.base import SSLModule

    def guards(module):
        return [c for c in module.configure_callbacks() if isinstance(c, NonFiniteGuard)]

    module = SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT))
    assert [type(c) for c in guards(module)] == [NonFiniteGuard]
    mine = NonFiniteGuard(check_every_n_steps=1)
    module.trainer = pl.Trainer(**quiet_trainer_kwargs(callbacks=[mine]))
    assert guards(module) == []
    assert guards(SSLModule("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), nonfinite_guard=False)) == []
