"""What a training step returns and what it does not do: host syncs, extra forwards, bank-size temporaries."""
import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ssl_modules.functional.cribo as cribo_functional
from support.common import TINY_VIT
from ssl_modules.methods.bam import BAM
from ssl_modules.methods.cribo import CrIBo
from ssl_modules.networks.heads import NormalizedLinear
from ssl_modules.testing import random_views
from ssl_modules.methods.vicregl import VICRegL

CRIBO = dict(backbone_kwargs=dict(TINY_VIT), out_dim=128, object_out_dim=128, head_hidden_dim=64,
             head_bottleneck_dim=32, num_clusters=4, queue_size=64)


def tiny(method: str, **overrides):
    torch.manual_seed(0)
    if method == "cribo":
        return CrIBo("vit_tiny_patch16_224", **{**CRIBO, **overrides}), random_views(4, [32, 32])
    if method == "bam":
        return (BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths=[32, 16], top_k=0,
                    **overrides), random_views(4, [32, 32, 16]))
    return (VICRegL("convnext_atto", expander_widths="32-32", projector_widths="16-16", num_matches=(4, 2),
                    **overrides), random_views(4, [96, 96, 64]))


def _quiet(module):
    module.log_terms = lambda terms, **kwargs: None
    return module


def _embedding_backbone(module):
    return module.teacher["backbone"] if getattr(module, "has_teacher", False) else module.backbone


@pytest.mark.parametrize("method", ["cribo", "bam", "vicregl"])
def test_step_returns_the_detached_global_feature_of_the_first_crop(method):
    module, views = tiny(method)
    module = _quiet(module)
    out = module.training_step(views, 0)
    assert set(out) == {"loss", "embedding"} and out["loss"].requires_grad and not out["embedding"].requires_grad
    backbone = _embedding_backbone(module)
    assert out["embedding"].shape == (views.batch_size, backbone.num_features)
    with module.evaluating(), torch.no_grad():  # no drop path: the teacher's features are deterministic
        expected = module.encode(backbone, views.crops[0]).global_
    if method == "cribo":  # a teacher without stochastic depth gives exactly the step's features
        torch.testing.assert_close(out["embedding"], expected)
    else:
        assert out["embedding"].shape == expected.shape


class _HostSyncs:
    """Counts calls that copy a tensor value to the host (on an accelerator each one stalls the step)."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))
        original_nonzero = torch.nonzero
        monkeypatch.setattr(torch, "nonzero", self._counting("torch.nonzero", original_nonzero))

    def _counting(self, name, original):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return wrapper


def test_the_sync_counter_sees_item_bool_and_nonzero(monkeypatch):
    syncs = _HostSyncs(monkeypatch)
    x = torch.ones(3)
    x.sum().item(), bool(x.any()), torch.nonzero(x)
    assert syncs.calls == ["item", "__bool__", "torch.nonzero"]


@pytest.mark.parametrize("method", ["cribo", "bam", "vicregl"])
def test_step_and_backward_make_no_host_sync(method, monkeypatch):
    module, views = tiny(method)
    module = _quiet(module)
    module.training_step(views, 0)  # first step: lazy initialisation may look at values
    # the one value check of the functional core runs on CPU tensors only (free there, skipped on GPUs)
    monkeypatch.setattr(cribo_functional, "_values_checkable", lambda t: False)
    syncs = _HostSyncs(monkeypatch)
    module.training_step(views, 1)["loss"].backward()
    assert syncs.calls == []


class _LargestNewTensor(TorchDispatchMode):
    def __init__(self, known):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in known}
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.largest = max(self.largest, (t.untyped_storage().nbytes(), str(func)))
        return out


def test_cribo_step_allocates_nothing_of_bank_size_beyond_the_bank():
    module, views = tiny("cribo", queue_size=8192, search_chunk_size=2048)
    module = _quiet(module)
    bank_view = module.memory_bank.keys[0].numel() * module.memory_bank.keys.element_size()  # 8 MiB
    with _LargestNewTensor([*module.parameters(), *module.buffers()]) as mode:
        module.training_step(views, 0)["loss"].backward()
    assert mode.largest[0] < bank_view / 8, mode.largest


def test_prototype_layers_start_like_nn_linear():
    torch.manual_seed(0)
    layer = NormalizedLinear(256, 2000)
    torch.manual_seed(0)
    linear = nn.Linear(256, 2000, bias=False)
    assert torch.equal(layer.weight_v, linear.weight)
    torch.testing.assert_close(layer.weight_v.norm(dim=1).mean(), torch.tensor(1 / math.sqrt(3)), rtol=0.01, atol=0)
    head = CrIBo("vit_tiny_patch16_224", **CRIBO).head
    bound = 1 / math.sqrt(CRIBO["head_bottleneck_dim"])  # kaiming-uniform a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    for prototypes in (head.last_layer, head.last_layer_c):
        assert prototypes.weight_v.abs().max() <= bound and prototypes.weight_v.abs().max() > 0.9 * bound


def test_cribo_pools_the_teacher_objects_in_float32_under_bf16_autocast():
    module, views = tiny("cribo")
    module = _quiet(module)
    pushed = []
    enqueue = module.memory_bank.enqueue_
    module.memory_bank.enqueue_ = lambda objects, valid: (pushed.append(objects), enqueue(objects, valid))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.training_step(views, 0)
    labels = torch.randint(0, 4, (2, 2, 16))
    dense = [torch.randn(2, 16, 8).bfloat16() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = cribo_functional.object_representations(dense, labels, 4)["objects"]
    full = cribo_functional.object_representations([d.float() for d in dense], labels, 4)["objects"]
    assert pushed[0].dtype == torch.float32 and half.dtype == torch.float32 and torch.equal(half, full)


def test_a_step_does_not_loop_over_crops_in_python_for_the_teacher():
    module, views = tiny("cribo")
    module = _quiet(module)
    calls = []
    teacher = module.teacher["backbone"]
    original = teacher.forward
    with contextlib.ExitStack():
        teacher.forward = lambda x: (calls.append(x.shape[0]), original(x))[1]
        module.training_step(views, 0)
    assert calls == [2 * views.batch_size]  # both global crops in one call
