"""FSDP2 pieces on 2 gloo processes: a module sharded by ``shard_parts`` gives the gradients, the clipped
gradients (global norm and per parameter), the EMA teacher update and the non-finite check of the same module
unsharded (docs/fsdp2.md)."""
from __future__ import annotations

import copy

import torch
from support.distributed_utils import run_distributed
from torch import nn

from ssl_modules.checkpoints.export import non_finite_weights
from ssl_modules.methods.base import clip_per_parameter_
from ssl_modules.run.sharding import full_tensor, gathered, is_sharded, shard_parts


class Blocks(nn.Module):
    """A backbone of two repeated blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


class Student(nn.Module):
    """A backbone of repeated blocks, a head with two children, and a teacher copying both (as TeacherEMA)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = Blocks()
        self.head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(self.backbone), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        with torch.no_grad():  # a teacher that differs from the student, as after some steps
            for p in self.teacher.parameters():
                p.mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _grads_after(model: Student, clip_mode: str | None, clip: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    (model(x) ** 2).sum().mul(10).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if clip_mode == "global_norm":
        torch.nn.utils.clip_grad_norm_(params, clip)
    elif clip_mode == "per_parameter":
        clip_per_parameter_(params, clip)
    return {n: full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def _ema(model: Student, momentum: float) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        for name in ("backbone", "head"):
            teacher = list(model.teacher[name].parameters())
            student = [p.detach() for p in getattr(model, name).parameters()]
            torch._foreach_lerp_(teacher, student, 1.0 - momentum)
    return {n: full_tensor(p).clone() for n, p in model.teacher.named_parameters()}


def _sharded_run(rank: int, world: int, clip_mode: str | None, clip: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = Student()
    sharded = shard_parts(model, init_device_mesh("cpu", (world,)))
    all_dtensors = all(is_sharded(p) for p in model.parameters())
    grads = _grads_after(model, clip_mode, clip)
    teacher = _ema(model, 0.9)
    with torch.no_grad():
        if rank == 1:  # a NaN in one process's shard only
            model.head[0].weight.to_local().view(-1)[0] = float("nan")
    return {"sharded": sharded, "all_dtensors": all_dtensors, "grads": grads, "teacher": teacher,
            "bad": non_finite_weights(dict(model.named_parameters()))}


def _compare(clip_mode: str | None, clip: float) -> None:
    reference = Student()
    grads = _grads_after(reference, clip_mode, clip)
    if clip_mode is not None:  # the threshold binds: the clipped gradients differ from the raw ones
        raw = _grads_after(Student(), None, 0.0)
        assert any(not torch.allclose(raw[name], grad) for name, grad in grads.items())
    teacher = _ema(reference, 0.9)
    for result in run_distributed(_sharded_run, 2, (clip_mode, clip)):
        assert result["sharded"] == ["backbone", "head", "teacher.backbone", "teacher.head"]
        assert result["all_dtensors"]
        for name, grad in grads.items():
            torch.testing.assert_close(result["grads"][name], grad, msg=name)
        for name, value in teacher.items():
            torch.testing.assert_close(result["teacher"][name], value, msg=name)
        assert result["bad"] == "1 tensors: head.0.weight"  # seen on both processes


def test_sharded_gradients_and_ema_equal_the_unsharded_module():
    _compare(None, 0.0)


def test_global_norm_clipping_of_sharded_gradients_uses_the_whole_norm():
    _compare("global_norm", 0.5)


def test_per_parameter_clipping_of_sharded_gradients_uses_each_whole_norm():
    _compare("per_parameter", 0.5)


def _uneven_forwards(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    model = Student()
    shard_parts(model, init_device_mesh("cpu", (world,)))
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    with torch.no_grad(), gathered(model.backbone):  # rank r runs r + 1 forwards: no collective inside
        outputs = [model.backbone(x) for _ in range(rank + 1)]
    return {"output": outputs[-1], "resharded": all(is_sharded(p) for p in model.backbone.parameters())}


def test_gathered_forwards_issue_no_collective_and_reshard_afterwards():
    expected = Student().backbone(torch.linspace(-1, 1, 24).reshape(4, 6)).detach()
    for result in run_distributed(_uneven_forwards, 2):
        torch.testing.assert_close(result["output"], expected)
        assert result["resharded"]
