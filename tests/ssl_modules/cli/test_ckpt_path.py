"""``fit --ckpt_path``: ``last`` after a default run, another method's checkpoint, differing hyper-parameters."""
from __future__ import annotations

import pytest
from support.resume_testkit import tiny_args


def _fit(root, method="vicregl", extra=()):
    from ssl_modules.cli.lightning import run_cli as main

    return main(tiny_args(method, root, 0, ["--trainer.max_epochs=1", "--trainer.logger=true",
                                            "--data.init_args.scene.num_train=64", *extra]))


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A default 1-epoch run (Lightning's own checkpointing, version folders, no save_last)."""
    root = tmp_path_factory.mktemp("run")
    _fit(root)
    return root


def test_ckpt_path_last_resumes_the_newest_checkpoint_of_a_default_run(default_run, capsys):
    cli = _fit(default_run, extra=["--trainer.max_epochs=2", "--ckpt_path=last"])
    assert "--ckpt_path last: resuming" in capsys.readouterr().out
    assert cli.trainer.global_step == 4  # 2 steps of epoch 0 restored, 2 of epoch 1 trained


def test_ckpt_path_last_without_checkpoints_starts_a_new_run(tmp_path, capsys):
    cli = _fit(tmp_path, extra=["--ckpt_path=last"])
    assert "no checkpoint under" in capsys.readouterr().out
    assert cli.trainer.global_step == 2


def test_a_checkpoint_of_another_method_fails_before_training_naming_both(default_run, tmp_path):
    checkpoint = next(default_run.rglob("epoch=0-step=2.ckpt"))
    with pytest.raises(ValueError, match="ssl_modules.VICRegL.*ssl_modules.CrIBo"):
        _fit(tmp_path, method="cribo", extra=[f"--ckpt_path={checkpoint}"])
    assert not any(tmp_path.rglob("*.ckpt"))  # nothing trained


def test_differing_hyper_parameters_are_applied_and_listed(default_run, tmp_path, capsys):
    checkpoint = next(default_run.rglob("epoch=0-step=2.ckpt"))
    cli = _fit(tmp_path, extra=["--trainer.max_epochs=2", f"--ckpt_path={checkpoint}", "--model.init_args.lr=0.001"])
    out = capsys.readouterr().out
    assert "lr: 0.002 -> 0.001" in out
    assert cli.model.hparams.lr == 0.001
