"""Each method's schedules and teacher against the official formulas (issue 18), the range checks of the
method arguments and the warnings for warm-ups longer than the run (issue 16)."""
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from support.common import TINY_VIT, quiet_trainer_kwargs
from ssl_modules.methods.bam import BAM
from ssl_modules.methods.cribo import CrIBo
from ssl_modules.optimization.schedules import RunPlan
from ssl_modules.testing import random_views
from ssl_modules.methods.vicregl import VICRegL

CRIBO = dict(backbone_kwargs=dict(TINY_VIT), out_dim=128, object_out_dim=128, head_hidden_dim=64,
             head_bottleneck_dim=32, num_clusters=4, queue_size=64)
BAM_TINY = dict(backbone_kwargs=dict(TINY_VIT), projector_widths="64-64-32", top_k=8)
VICREGL_TINY = dict(expander_widths="32-32", projector_widths="16-16")


def tiny_cribo(**overrides):
    return CrIBo("vit_tiny_patch16_224", **{**CRIBO, **overrides})


def tiny_bam(**overrides):
    return BAM("vit_tiny_patch16_224", **{**BAM_TINY, **overrides})


def dino_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    """The official ``utils.cosine_scheduler`` of DINO, CrIBo and BAM (numpy)."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


def values(schedule, steps):
    return np.array([schedule(i) for i in range(steps)])


# ------------------------------------------------------------------------------------------ LR warm-ups
@pytest.mark.parametrize("make, lr, min_lr", [(tiny_cribo, 5e-4, 1e-5), (tiny_bam, 3e-4, 1e-3)])
def test_cribo_and_bam_lr_wd_and_momentum_are_the_official_numpy_schedules(make, lr, min_lr):
    module = make(warmup_epochs=3)
    plan = RunPlan(total_steps=10 * 7, steps_per_epoch=7, global_batch_size=1024)
    schedules = module.declare_schedules(plan)
    peak = lr * 1024 / 256
    np.testing.assert_allclose(values(schedules["lr"], 70), dino_cosine_scheduler(peak, min_lr, 10, 7, 3), rtol=1e-12)
    assert schedules["lr"](3 * 7 - 1) == pytest.approx(peak)  # linspace: the peak at step W - 1
    np.testing.assert_allclose(values(schedules["weight_decay"], 70), dino_cosine_scheduler(0.04, 0.4, 10, 7),
                               rtol=1e-12)
    m0 = module.hparams.ema_momentum
    np.testing.assert_allclose(values(schedules["ema_momentum"], 70), dino_cosine_scheduler(m0, 1.0, 10, 7),
                               rtol=1e-12)


def test_vicregl_lr_is_the_official_learning_schedule():
    module = VICRegL("convnext_atto", **VICREGL_TINY)
    plan = RunPlan(total_steps=100, steps_per_epoch=5, global_batch_size=512)
    lr = module.declare_schedules(plan)["lr"]
    peak, warmup = 5e-4 * 512 / 256, 50  # 10 warm-up epochs of 5 steps
    for step in (0, 1, 25, 49):
        assert lr(step) == pytest.approx(peak * step / warmup, rel=1e-12)  # step / warmup_steps, not / (W - 1)
    q = 0.5 * (1 + np.cos(np.pi * 25 / 50))
    assert lr(75) == pytest.approx(peak * q + peak * 1e-3 * (1 - q), rel=1e-12)


# ------------------------------------------------------------------------------------------ CrIBo
def test_cribo_teacher_temperatures_are_the_official_per_epoch_linspace():
    module = tiny_cribo(warmup_teacher_temp_epochs=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                        warmup_object_teacher_temp=0.03, object_teacher_temp=0.06)
    plan = RunPlan(total_steps=10 * 3, steps_per_epoch=3)
    schedules = module.declare_schedules(plan)
    for name, start, end in (("teacher_temp", 0.04, 0.07), ("object_teacher_temp", 0.03, 0.06)):
        official = np.concatenate((np.linspace(start, end, 4), np.ones(10 - 4) * end))  # per epoch
        np.testing.assert_allclose(values(schedules[name], 30), np.repeat(official, 3), rtol=1e-12)


def test_cribo_one_epoch_temperature_warmup_gives_the_start_value_at_epoch_0():
    schedules = tiny_cribo(warmup_teacher_temp_epochs=1).declare_schedules(RunPlan(30, 3))
    assert [schedules["teacher_temp"](3 * e) for e in range(3)] == [0.04, 0.07, 0.07]  # linspace(0.04, 0.07, 1)


@pytest.mark.parametrize("epochs, disabled", [(1, True), (2, True), (3, False)])
def test_cribo_runs_of_at_most_two_epochs_have_no_lr_and_no_temperature_warmup(epochs, disabled):
    module = tiny_cribo(warmup_epochs=1, warmup_teacher_temp_epochs=2, min_lr=0.0)
    plan = RunPlan(total_steps=epochs * 4, steps_per_epoch=4, global_batch_size=256)
    schedules = module.declare_schedules(plan)
    official_warmup = 0 if disabled else 1
    np.testing.assert_allclose(values(schedules["lr"], epochs * 4),
                               dino_cosine_scheduler(5e-4, 0.0, epochs, 4, official_warmup), rtol=1e-12)
    assert schedules["teacher_temp"](0) == (0.07 if disabled else 0.04)


def test_cribo_a_run_cut_to_two_epochs_by_max_steps_counts_as_two_epochs():
    plan = RunPlan(total_steps=8, steps_per_epoch=4)  # e.g. max_epochs=100, max_steps=8
    assert tiny_cribo().declare_schedules(plan)["teacher_temp"](0) == 0.07


def test_cribo_prototype_layers_are_a_parameter_group_with_a_zero_lr_during_the_freeze():
    module = tiny_cribo(freeze_last_layer_epochs=2, warmup_epochs=0)
    groups = module.configure_optimizers().param_groups
    last = [g for g in groups if g["lr_schedule"] == "last_layer_lr"]
    names = {id(p): n for n, p in module.named_parameters()}
    assert {names[id(p)] for g in last for p in g["params"]} == {
        n for n, p in module.head.named_parameters(prefix="head") if "last_layer" in n and p.requires_grad}
    assert not any("last_layer" in names[id(p)] for g in groups if g["lr_schedule"] == "lr" for p in g["params"])
    schedules = module.declare_schedules(RunPlan(total_steps=50, steps_per_epoch=5))
    assert [schedules["last_layer_lr"](s) for s in range(10)] == [0.0] * 10  # epochs 0 and 1 (dinov2 rule)
    assert [schedules["last_layer_lr"](s) for s in range(10, 50)] == [schedules["lr"](s) for s in range(10, 50)]


def cribo_loader(steps):
    views = random_views(4, [32, 32], seed=1)
    return DataLoader(range(steps), batch_size=None, collate_fn=lambda _: views)


class UnscaleProbe(torch.amp.GradScaler):
    """A CPU grad scaler that records, when it unscales, which prototype-layer gradients exist."""

    def __init__(self, module):
        super().__init__("cpu", init_scale=16.0)
        self.module, self.seen = module, []

    def unscale_(self, optimizer):
        self.seen.append([p.grad is not None for n, p in self.module.head.named_parameters() if "last_layer" in n])
        return super().unscale_(optimizer)


def test_cribo_frozen_prototype_gradients_are_gone_before_the_fp16_scaler_unscales():
    """Official ``cancel_gradients_last_layer`` runs before the scaler's inf check: the scaler never sees the
    frozen layers' gradients, so an fp16 overflow in them cannot make it skip the step. (The tiny model's
    fp16 loss on CPU is not finite; the guard is off because only the hook order is under test.)"""
    torch.manual_seed(0)
    module = tiny_cribo(warmup_epochs=0, lr=1e-3, freeze_last_layer_epochs=1, nonfinite_guard=False)
    scaler = UnscaleProbe(module)
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=2), plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(module, cribo_loader(2))
    assert len(scaler.seen) == 4
    assert scaler.seen[:2] == [[False] * 4] * 2  # epoch 0 (frozen): no prototype gradient when unscaling
    assert scaler.seen[2:] == [[True] * 4] * 2  # epoch 1: the prototype layers train


def test_cribo_frozen_prototype_layers_get_no_adamw_state_and_no_decay():
    torch.manual_seed(0)
    module = tiny_cribo(warmup_epochs=0, lr=1e-3, freeze_last_layer_epochs=1)
    start = module.backbone.model.cls_token.detach().clone()
    prototypes = {n: p.detach().clone() for n, p in module.head.named_parameters() if "last_layer" in n}
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=1))
    trainer.fit(module, cribo_loader(2))
    assert not torch.equal(module.backbone.model.cls_token, start)  # the student stepped
    optimizer = trainer.optimizers[0]
    for name, param in module.head.named_parameters():
        if "last_layer" in name:
            assert torch.equal(param, prototypes[name]) and not optimizer.state.get(param), name


class Temps(Callback):
    def __init__(self):
        self.temps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.temps.append((trainer.global_step, module.temperatures(),
                           [g["lr"] for g in trainer.optimizers[0].param_groups]))


def test_cribo_fit_applies_the_declared_schedules_to_the_step_and_the_groups():
    module = tiny_cribo(warmup_teacher_temp_epochs=3, warmup_epochs=0, freeze_last_layer_epochs=1, lr=1e-3)
    rec = Temps()
    pl.Trainer(**quiet_trainer_kwargs(max_epochs=3), callbacks=[rec]).fit(module, cribo_loader(2))
    np.testing.assert_allclose([t for _, t, _ in rec.temps],
                               [(0.04, 0.04)] * 2 + [(0.055, 0.055)] * 2 + [(0.07, 0.07)] * 2)
    groups = module.trainer.optimizers[0].param_groups
    frozen = [i for i, g in enumerate(groups) if g["lr_schedule"] == "last_layer_lr"]
    assert all(rec.temps[s][2][i] == 0.0 for s in (0, 1) for i in frozen)
    assert all(rec.temps[s][2][i] == rec.temps[s][2][0] > 0 for s in (2, 3) for i in frozen)


# ------------------------------------------------------------------------------------------ BAM
def test_bam_sinkhorn_temperature_ramp_is_the_official_per_epoch_linspace():
    module = tiny_bam(sinkhorn_temperature=0.05, sinkhorn_temperature_final=0.03, sinkhorn_warmup_epochs=5)
    schedule = module.declare_schedules(RunPlan(total_steps=8 * 2, steps_per_epoch=2))["sinkhorn_temperature"]
    official = np.concatenate((np.linspace(0.05, 0.03, 5), np.ones(8 - 5) * 0.03))  # final at epoch E - 1
    np.testing.assert_allclose(values(schedule, 16), np.repeat(official, 2), rtol=1e-12)
    constant = tiny_bam().declare_schedules(RunPlan(16, 2))["sinkhorn_temperature"]
    assert values(constant, 16).tolist() == [0.05] * 16


class BAMTeacherSeen(BAM):
    """Records the student and the teacher as the training step sees them."""

    def training_step(self, views, batch_idx):
        self.seen.append((self.backbone.model.cls_token.detach().clone(),
                          self.teacher["backbone"].model.cls_token.detach().clone()))
        return super().training_step(views, batch_idx)


def test_bam_teacher_moves_before_its_forward_with_the_momentum_of_the_iteration():
    torch.manual_seed(0)
    module = BAMTeacherSeen("vit_tiny_patch16_224", **BAM_TINY, warmup_epochs=0, lr=1e-2, ema_momentum=0.9)
    module.seen = []
    teacher = module.teacher["backbone"].model.cls_token.detach().clone()
    views = random_views(4, [32, 32, 16], seed=2)
    loader = DataLoader(range(4), batch_size=None, collate_fn=lambda _: views)
    pl.Trainer(**quiet_trainer_kwargs(max_epochs=1)).fit(module, loader)
    m = dino_cosine_scheduler(0.9, 1.0, 1, 4)
    for i, (student, seen) in enumerate(module.seen):  # official: update_teacher() with m[i], then forward
        teacher = m[i] * teacher + (1 - m[i]) * student
        torch.testing.assert_close(seen, teacher)
    assert not torch.equal(module.seen[1][1], module.seen[3][1])


def test_cribo_teacher_moves_after_the_step_with_the_momentum_of_that_step():
    assert tiny_cribo()._ema_update == "after_step" and tiny_bam()._ema_update == "before_forward"


# ------------------------------------------------------------------------------------------ VICRegL LARS
@pytest.mark.parametrize("optimizer, given, expected", [("lars", None, 1e-6), ("adamw", None, 0.05),
                                                        ("lars", 1e-4, 1e-4)])
def test_vicregl_lars_uses_the_official_weight_decay_unless_one_is_given(optimizer, given, expected):
    module = VICRegL("convnext_atto", optimizer=optimizer, weight_decay=given, **VICREGL_TINY)
    assert module.hparams.weight_decay == expected
    decayed = [g for g in module.configure_optimizers().param_groups if g["decayed"]]
    assert decayed and all(g["weight_decay"] == expected for g in decayed)


# ------------------------------------------------------------------------------------------ range checks
@pytest.mark.parametrize("name, value, rule, default", [
    ("teacher_temp", 0.0, "> 0", "0.07"), ("student_temp", -1.0, "> 0", "0.1"),
    ("center_momentum", 2.0, r"in \[0, 1\)", "0.9"), ("center_momentum", 1.0, r"in \[0, 1\)", "0.9"),
    ("warmup_teacher_temp", 0.0, "> 0", "0.04"), ("object_teacher_temp", -0.07, "> 0", "0.07"),
    ("warmup_object_teacher_temp", 0.0, "> 0", "0.04"), ("object_student_temp", 0.0, "> 0", "0.1"),
    ("ema_momentum", 1.1, r"in \[0, 1\]", "0.996"), ("warmup_teacher_temp_epochs", -1, ">= 0", "30"),
    ("freeze_last_layer_epochs", -1, ">= 0", "1"), ("cross_image_start_epoch", -1, ">= 0", "1"),
    ("pos_weight", -1.0, ">= 0", "1.0"), ("cluster_sinkhorn_lambda", 0.0, "> 0", "20.0"),
    ("cluster_iterations", 0, ">= 1", "5"), ("lr", 0.0, "> 0", "0.0005"),
])
def test_cribo_rejects_out_of_range_arguments(name, value, rule, default):
    with pytest.raises(ValueError, match=rf"CrIBo: {name}={value!r} must be {rule} \(CrIBo's default: {default}\)"):
        tiny_cribo(**{name: value})


@pytest.mark.parametrize("name, value, rule", [
    ("softmax_temperature", 0.0, "> 0"), ("sinkhorn_temperature", -0.05, "> 0"),
    ("sinkhorn_temperature_final", 0.0, "> 0"), ("ema_momentum", -0.1, r"in \[0, 1\]"),
    ("num_sinkhorn_iters", -1, ">= 0"), ("top_k", -1, ">= 0"), ("sinkhorn_warmup_epochs", -1, ">= 0"),
])
def test_bam_rejects_out_of_range_arguments(name, value, rule):
    with pytest.raises(ValueError, match=rf"BAM: {name}={value!r} must be {rule} \(BAM's default: "):
        tiny_bam(**{name: value})


@pytest.mark.parametrize("name, value, rule", [
    ("alpha", 1.5, r"in \[0, 1\]"), ("inv_coeff", -1.0, ">= 0"), ("var_coeff", -25.0, ">= 0"),
    ("cov_coeff", -1.0, ">= 0"), ("eps", 0.0, "> 0"), ("weight_decay", -0.05, ">= 0"),
])
def test_vicregl_rejects_out_of_range_arguments(name, value, rule):
    with pytest.raises(ValueError, match=rf"VICRegL: {name}={value!r} must be {rule} \(VICRegL's default: "):
        VICRegL("convnext_atto", **VICREGL_TINY, **{name: value})


# ------------------------------------------------------------------------------------------ warnings
@pytest.mark.parametrize("overrides, message", [
    (dict(warmup_teacher_temp_epochs=5), r"warmup_teacher_temp_epochs=5 \(teacher-temperature warm-up\) lasts 10"),
    (dict(freeze_last_layer_epochs=4), r"freeze_last_layer_epochs=4 \(frozen prototype layers\) lasts 8"),
    (dict(warmup_epochs=4.0), r"warmup_epochs=4 \(learning-rate warm-up\) lasts 8"),
])
def test_cribo_warns_at_fit_start_about_warmups_longer_than_the_run(overrides, message):
    module = tiny_cribo(**{"warmup_teacher_temp_epochs": 0, "warmup_epochs": 0.0, **overrides})
    trainer = pl.Trainer(**quiet_trainer_kwargs(max_epochs=3))  # 3 epochs of 2 batches: warm-ups are on
    with pytest.warns(UserWarning, match=message + r" optimizer steps, longer than the run \(6 steps = 3 epochs"):
        trainer.fit(module, cribo_loader(2))


def test_bam_warns_about_a_sinkhorn_ramp_longer_than_the_run():
    module = tiny_bam(sinkhorn_temperature_final=0.03, sinkhorn_warmup_epochs=30, warmup_epochs=0.0)
    views = random_views(4, [32, 32], seed=2)
    loader = DataLoader(range(2), batch_size=None, collate_fn=lambda _: views)
    with pytest.warns(UserWarning, match=r"sinkhorn_warmup_epochs=30 \(Sinkhorn-temperature ramp\) lasts 60"):
        pl.Trainer(**quiet_trainer_kwargs(max_epochs=3, max_steps=1)).fit(module, loader)
