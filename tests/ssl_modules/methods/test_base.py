import json
import math

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback

from support.common import quiet_trainer_kwargs
from ssl_modules.methods.base import clip_per_parameter_
from ssl_modules.optimization.schedules import cosine
from support.toy_method import ToyDistill, toy_loader


class Recorder(Callback):
    """Records, after every training batch, one student and one teacher tensor and the schedules."""

    def __init__(self):
        self.student, self.teacher, self.lr, self.wd, self.steps = [], [], [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.student.append(module.backbone.model.cls_token.detach().clone())
        self.teacher.append(module.teacher["backbone"].model.cls_token.detach().clone())
        group = trainer.optimizers[0].param_groups[0]
        self.lr.append(group["lr"])
        self.wd.append(group["weight_decay"])
        self.steps.append(trainer.global_step)


def fit(module, recorder=None, loader=None, **trainer_kwargs):
    trainer = pl.Trainer(**quiet_trainer_kwargs(**trainer_kwargs), callbacks=[recorder] if recorder else [])
    trainer.fit(module, loader or toy_loader())
    return trainer


def test_hyperparameters_of_subclass_and_base_are_saved():
    module = ToyDistill(head_dim=8, lr=1e-3)
    assert module.hparams.head_dim == 8 and module.hparams.lr == 1e-3
    assert module.hparams.backbone == "vit_tiny_patch16_224"


def test_teacher_follows_the_closed_form_ema():
    torch.manual_seed(0)
    module = ToyDistill(ema_momentum=0.8)
    start = module.teacher["backbone"].model.cls_token.detach().clone()
    rec = Recorder()
    fit(module, rec, max_epochs=2)
    total = module.total_steps
    assert total == 8 and rec.steps == list(range(1, 9))
    teacher = start
    for step, student in enumerate(rec.student):
        m = cosine(step, total, 0.8, 1.0)
        teacher = m * teacher + (1 - m) * student
        torch.testing.assert_close(rec.teacher[step], teacher)
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_teacher_updates_once_per_optimizer_step_under_gradient_accumulation():
    module = ToyDistill(warmup_epochs=0.0)  # a zero learning rate at step 0 would leave the student in place
    rec = Recorder()
    fit(module, rec, max_epochs=1, accumulate_grad_batches=2)
    changed = [not torch.equal(a, b) for a, b in zip(rec.teacher[:-1], rec.teacher[1:])]
    assert rec.steps == [0, 1, 1, 2]
    assert changed == [True, False, True]


def test_learning_rate_and_weight_decay_follow_the_schedule():
    module = ToyDistill(lr=0.256, warmup_epochs=1.0, min_lr=0.0, weight_decay=0.04, weight_decay_end=0.4)
    rec = Recorder()
    fit(module, rec, max_epochs=3)
    # batch 4 -> peak = 0.256 * 4 / 256 = 0.004; 4 warm-up steps over 12
    assert rec.lr[:4] == pytest.approx([0.0, 0.001, 0.002, 0.003])
    assert rec.lr[4] == pytest.approx(0.004)
    assert rec.lr[8] == pytest.approx(0.004 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))
    assert rec.wd[0] == pytest.approx(0.04) and rec.wd[6] == pytest.approx(0.22)


def test_resumed_run_continues_the_schedules_and_weights_exactly(tmp_path):
    def run(max_epochs, ckpt_path=None, seed=0):
        torch.manual_seed(seed)
        module = ToyDistill(weight_decay_end=0.4)
        rec = Recorder()
        trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=max_epochs, enable_checkpointing=True,
                                                    default_root_dir=tmp_path), callbacks=[rec])
        trainer.fit(module, toy_loader(), ckpt_path=ckpt_path)
        return module, rec, trainer

    full, full_rec, _ = run(4)
    half, _, half_trainer = run(2)
    half_trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, resumed_rec, _ = run(4, ckpt_path=tmp_path / "half.ckpt", seed=123)
    assert resumed_rec.lr == pytest.approx(full_rec.lr[8:])
    assert resumed_rec.wd == pytest.approx(full_rec.wd[8:])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_embed_uses_the_teacher_in_eval_mode_without_gradients():
    module = ToyDistill().train()
    with torch.no_grad():
        module.teacher["backbone"].model.cls_token.add_(1.0)
    images = torch.randn(2, 3, 32, 32)
    feats = module.embed(images)
    assert not feats.global_.requires_grad
    assert module.teacher["backbone"].training
    expected = module.teacher["backbone"].eval()(images).global_
    torch.testing.assert_close(feats.global_, expected)
    assert not torch.allclose(feats.global_, module.backbone.eval()(images).global_)


def test_exported_backbone_loads_into_timm_strictly(tmp_path):
    module = ToyDistill()
    path = module.export_backbone(tmp_path / "backbone.pt")
    meta = json.loads(path.with_suffix(".json").read_text())
    model = timm.create_model(meta["name"], **meta["model_kwargs"])
    model.load_state_dict(torch.load(path), strict=True)
    torch.testing.assert_close(model.cls_token, module.teacher["backbone"].model.cls_token)


def test_per_parameter_clipping_rescales_only_large_gradients():
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.1, 0.0])
    clip_per_parameter_([a, b], 1.0)
    torch.testing.assert_close(a.grad.norm(), torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.0]))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ToyDistill(optimizer="adam")
    with pytest.raises(ValueError, match=r"ema_momentum=1.5 must be in \[0, 1\] \(ToyDistill's default: 0.9\)"):
        ToyDistill(ema_momentum=1.5)


@pytest.mark.parametrize("name, value, rule", [
    ("lr", 0.0, "> 0"), ("min_lr", -1e-6, ">= 0"), ("min_lr_ratio", 2.0, r"in \[0, 1\]"),
    ("warmup_epochs", -1.0, ">= 0"), ("weight_decay", -0.1, ">= 0"), ("weight_decay_end", -0.4, ">= 0"),
    ("momentum", 1.0, r"in \[0, 1\)"), ("betas", (0.9, 1.5), r"in \[0, 1\)"), ("lars_eta", 0.0, "> 0"),
    ("clip_grad", -1.0, ">= 0"), ("lr", float("nan"), "> 0"),
])
def test_out_of_range_optimisation_arguments_name_the_argument_range_and_default(name, value, rule):
    with pytest.raises(ValueError, match=rf"ToyDistill: {name}=.* must be {rule} \(ToyDistill's default: "):
        ToyDistill(**{name: value})


def test_several_bad_arguments_are_reported_together():
    with pytest.raises(ValueError, match="lr=-1.* must be > 0.*; weight_decay=-1.* must be >= 0"):
        ToyDistill(lr=-1.0, weight_decay=-1.0)


def test_a_final_learning_rate_above_the_peak_warns():
    # batch 4: peak = 0.256 * 4 / 256 = 0.004 < min_lr 0.01 (an absolute floor, as BAM's published 1e-3)
    with pytest.warns(UserWarning, match="min_lr .* above the peak"):
        fit(ToyDistill(lr=0.256, min_lr=0.01), max_epochs=1)


# ------------------------------------------------------------------------------------------ teacher order
class TeacherAtStep(Callback):
    """The student and the teacher as the training step sees them (after the module's batch-start hook)."""

    def __init__(self):
        self.student, self.teacher = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        module._recorder = self


class RecordingToy(ToyDistill):
    def training_step(self, batch, batch_idx):
        rec = getattr(self, "_recorder", None)
        if rec is not None:
            rec.student.append(self.backbone.model.cls_token.detach().clone())
            rec.teacher.append(self.teacher["backbone"].model.cls_token.detach().clone())
        return super().training_step(batch, batch_idx)


def test_before_forward_update_is_bam_official_order():
    """BAM: at iteration i the teacher moves with m[i] from the current student, then runs its forward."""
    torch.manual_seed(0)
    module = RecordingToy(ema_momentum=0.8, ema_update="before_forward", warmup_epochs=0.0)
    teacher = module.teacher["backbone"].model.cls_token.detach().clone()
    rec = TeacherAtStep()
    fit(module, rec, max_epochs=2)
    total = module.total_steps
    for step, (student, seen) in enumerate(zip(rec.student, rec.teacher)):
        m = 1 - (1 - 0.8) * (1 + math.cos(math.pi * step / total)) / 2
        teacher = m * teacher + (1 - m) * student
        torch.testing.assert_close(seen, teacher)
    assert len(rec.teacher) == total == 8


def test_before_forward_update_happens_once_per_optimizer_step_under_accumulation():
    module = RecordingToy(ema_update="before_forward", warmup_epochs=0.0)
    rec = TeacherAtStep()
    fit(module, rec, max_epochs=2, accumulate_grad_batches=2)
    changed = [not torch.equal(a, b) for a, b in zip(rec.teacher[:-1], rec.teacher[1:])]
    assert changed == [False, True, False, True, False, True, False]  # micro-batch pairs share one teacher


class StopAfterEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = trainer.current_epoch == self.epoch


@pytest.mark.parametrize("update", ["after_step", "before_forward"])
def test_resume_continues_the_teacher_bit_exactly(tmp_path, update):
    def run(callbacks=(), ckpt_path=None, seed=0):
        torch.manual_seed(seed)
        module = ToyDistill(ema_update=update, warmup_epochs=1.0)
        trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=4, default_root_dir=tmp_path), callbacks=list(callbacks))
        trainer.fit(module, toy_loader(), ckpt_path=ckpt_path)
        return module, trainer

    full, _ = run()
    _, half_trainer = run([StopAfterEpoch(1)])  # the same 4-epoch run, stopped after epoch 1
    assert half_trainer.global_step == 8
    half_trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = run(ckpt_path=tmp_path / "half.ckpt", seed=123)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------ the schedule hook
class Logged(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("schedule/")})


def test_every_declared_schedule_is_logged_under_schedule():
    rec = Logged()
    fit(ToyDistill(), rec, max_epochs=1, log_every_n_steps=1)
    assert set(rec.values[0]) == {"schedule/lr", "schedule/weight_decay", "schedule/ema_momentum"}
    assert rec.values[1]["schedule/ema_momentum"] == pytest.approx(cosine(1, 4, 0.9, 1.0))


def test_an_epoch_is_the_real_number_of_batches_when_max_steps_binds():
    # 4 batches per epoch; max_steps=6 binds before max_epochs=100: the warm-up of 1 epoch is still 4 steps
    module = ToyDistill(lr=0.256, warmup_epochs=1.0, min_lr=0.0)
    rec = Recorder()
    trainer = fit(module, rec, max_epochs=100, max_steps=6)
    assert module.steps_per_epoch == 4 and module.total_steps == 6
    assert rec.lr[:4] == pytest.approx([0.0, 0.001, 0.002, 0.003])
    assert trainer.global_step == 6


def test_steps_per_epoch_counts_the_last_partial_accumulation_window():
    module = ToyDistill()
    fit(module, loader=toy_loader(n=20), max_epochs=2, accumulate_grad_batches=2)  # 5 batches: 3 steps/epoch
    assert module.steps_per_epoch == 3 and module.total_steps == 6 and module.trainer.global_step == 6


def test_a_warmup_longer_than_the_run_warns_at_fit_start():
    with pytest.warns(UserWarning, match=r"warmup_epochs=3 \(learning-rate warm-up\) lasts 12 optimizer steps, "
                                         r"longer than the run \(8 steps"):
        fit(ToyDistill(warmup_epochs=3.0), max_epochs=2)


def test_scheduled_values_outside_fit_are_the_start_values():
    module = ToyDistill(weight_decay=0.04, weight_decay_end=0.4)
    assert module.scheduled("lr") == 0.0 and module.scheduled("weight_decay") == pytest.approx(0.04)
    assert module.scheduled("ema_momentum") == 0.9
    with pytest.raises(KeyError, match="no schedule 'teacher_temp'"):
        module.scheduled("teacher_temp")


# ------------------------------------------------------------------------------------------ mixin API
class CountingMixin:
    """A user mixin above the method: its hooks run and the base's schedule hook still runs."""

    def on_train_batch_start(self, batch, batch_idx):
        self.counted = getattr(self, "counted", 0) + 1
        super().on_train_batch_start(batch, batch_idx)

    def on_train_start(self):
        self.started = True
        super().on_train_start()


class CountedToy(CountingMixin, ToyDistill):
    pass


def test_hooks_are_cooperative_through_user_mixins():
    rec = Recorder()
    module = CountedToy(lr=0.256, warmup_epochs=1.0, min_lr=0.0)
    fit(module, rec, max_epochs=1)
    assert module.counted == 4 and module.started
    assert rec.lr == pytest.approx([0.0, 0.001, 0.002, 0.003])  # the schedule hook ran below the mixin


def test_teacher_api_gives_the_copies_and_the_embedding_backbone():
    module = ToyDistill()
    assert module.has_teacher and module.embedding_backbone is module.teacher_copy("backbone")
    assert module.teacher_copy("head") is module.teacher["head"]
    with pytest.raises(KeyError, match="no teacher copy of 'projector'"):
        module.teacher_copy("projector")
