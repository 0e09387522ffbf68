"""The stop checkpoint's copy of the training state (issue 26, point 6): made in host memory, once.

A graceful stop in the middle of an epoch freezes the training state (``ExactResume``) and every later save of
that fit writes the frozen copy. On this CPU-only test machine a tensor's device cannot show that the copy left
the GPU, so the tests check the contract of the copy (``_detached_copy``): detached tensors in CPU memory that
share no storage with the training state, the checkpoint's nesting and types kept, non-tensor values copied;
that later saves reuse the frozen tensors instead of copying them again; and that the stop path makes it. The
one test that measures device memory runs only where CUDA is available.
"""
from __future__ import annotations

import collections
from types import SimpleNamespace

import pytest
import torch

from ssl_modules.run import resume
from ssl_modules.run.resume import ExactResume, _detached_copy

Pair = collections.namedtuple("Pair", "first second")


def _training_state() -> dict:
    """A checkpoint-shaped dict: a state dict with a live parameter, optimizer state (nested dicts keyed by
    ints, a tuple of betas), loop and hyper-parameter values, a tensor that appears twice, a named tuple."""
    weight = torch.nn.Parameter(torch.randn(4, 3))
    moment = torch.randn(4, 3)
    return {
        "state_dict": collections.OrderedDict(weight=weight, bank=torch.arange(6.0)),
        "optimizer_states": [{"state": {0: {"exp_avg": moment, "step": torch.tensor(3.0)}},
                              "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.999)}]}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 1}}}},
        "hyper_parameters": {"global_scale": [0.25, 1.0]},
        "callbacks": {"probe": {"head": moment, "pair": Pair(torch.ones(2), "text")}},
        "global_step": 20,
    }


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def test_the_stop_copy_holds_detached_host_tensors_in_the_checkpoints_structure():
    """Contract of the copy. Fails on the former ``copy.deepcopy``: it kept the live ``Parameter`` (with
    ``requires_grad``) instead of a detached tensor. The CPU placement itself only shows on a GPU machine."""
    state = _training_state()
    copy = _detached_copy(state)
    originals, copies = _tensors(state), _tensors(copy)
    assert len(originals) == len(copies)
    for original, copied in zip(originals, copies):
        assert copied.device.type == "cpu" and type(copied) is torch.Tensor and not copied.requires_grad
        assert copied.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
        assert torch.equal(copied, original.detach())
    with torch.no_grad():  # later training changes the live state in place: the copy keeps the stop's
        state["state_dict"]["weight"].add_(1.0)
        state["optimizer_states"][0]["state"][0]["exp_avg"].zero_()
    assert not torch.equal(copy["state_dict"]["weight"], state["state_dict"]["weight"].detach())
    assert copy["optimizer_states"][0]["state"][0]["exp_avg"].abs().sum() > 0
    # the nesting and container types are the checkpoint's; a tensor that appears twice is copied once
    assert type(copy["state_dict"]) is collections.OrderedDict
    assert copy["optimizer_states"][0]["param_groups"] == [{"params": [0], "lr": 0.1, "betas": (0.9, 0.999)}]
    assert copy["callbacks"]["probe"]["head"] is copy["optimizer_states"][0]["state"][0]["exp_avg"]
    assert isinstance(copy["callbacks"]["probe"]["pair"], Pair) and copy["callbacks"]["probe"]["pair"].second == "text"
    # non-tensor values are equal copies: changing the live ones leaves the copy alone
    state["hyper_parameters"]["global_scale"].append(2.0)
    state["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] = 5
    assert copy["hyper_parameters"] == {"global_scale": [0.25, 1.0]} and copy["global_step"] == 20
    assert copy["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1


def test_a_tensor_inside_an_autograd_graph_is_copied():
    """A callback state may hold a tensor computed with gradients; ``copy.deepcopy`` (the former copy) raises
    "Only Tensors created explicitly by the user support the deepcopy protocol" on it."""
    leaf = torch.ones(3, requires_grad=True)
    copy = _detached_copy({"callbacks": {"metric": {"value": leaf * 2}}})
    value = copy["callbacks"]["metric"]["value"]
    assert torch.equal(value, torch.full((3,), 2.0)) and value.grad_fn is None and not value.requires_grad


def test_later_saves_reuse_the_frozen_host_copy():
    """Every save after the stop writes the frozen copy's tensors themselves (the former code copied the whole
    state again for each save), in fresh containers that a save may change without changing the frozen copy."""
    callback = ExactResume()
    callback._stop_checkpoint = _detached_copy(_training_state())
    trainer = SimpleNamespace(_checkpoint_connector=SimpleNamespace())
    callback._freeze_later_checkpoints(trainer)
    first = trainer._checkpoint_connector.dump_checkpoint()
    second = trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
    frozen = callback._stop_checkpoint
    for dump in (first, second):
        assert all(a is b for a, b in zip(_tensors(dump), _tensors(frozen), strict=True))
        assert dump is not frozen and dump["state_dict"] is not frozen["state_dict"]
    first["rng_states"] = [{"torch": torch.zeros(1)}]
    first["state_dict"]["extra"] = torch.zeros(1)
    assert "rng_states" not in frozen and "extra" not in frozen["state_dict"]


def test_a_mid_epoch_stop_freezes_the_state_through_the_host_copy(tmp_path, monkeypatch):
    """The stop path of a real run (a ``should_stop`` stop at step 3 of 8, as ``max_time`` makes) copies the
    state through ``_detached_copy`` exactly once, and the stop checkpoint it writes is that state. The former
    code copied it again for every later save (4 copies in this run: the stop and the saves on the way out)."""
    from support.resume_testkit import run

    made = []

    def recording_copy(checkpoint):
        made.append(_detached_copy(checkpoint))
        return made[-1]

    monkeypatch.setattr(resume, "_detached_copy", recording_copy)
    run("vicregl", tmp_path, stop_at=3, checkpoint_every_steps=None)
    assert len(made) == 1 and made[0]["global_step"] == 3
    assert all(tensor.device.type == "cpu" for tensor in _tensors(made[0]))
    saved = torch.load(tmp_path / "checkpoints" / "last-stop.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    for key, tensor in made[0]["state_dict"].items():
        assert torch.equal(saved["state_dict"][key], tensor), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to measure device memory")
def test_the_copy_of_device_tensors_takes_no_device_memory():
    """On a GPU: the copy of a checkpoint of CUDA tensors lives in host memory and allocates nothing on the
    device (the former ``copy.deepcopy`` cloned every tensor on the GPU)."""
    device = torch.device("cuda")
    state = {"state_dict": {"bank": torch.randn(1024, 1024, device=device)},
             "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(1024, 1024, device=device)}}}]}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    copy = _detached_copy(state)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(device) == before
    assert all(tensor.device.type == "cpu" for tensor in _tensors(copy))
    assert torch.equal(copy["state_dict"]["bank"], state["state_dict"]["bank"].cpu())
