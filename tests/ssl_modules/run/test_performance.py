"""Options for big runs: compiled backbones (with eager fallback), gradient checkpointing, channels-last."""
import warnings

import lightning.pytorch as pl
import pytest
import torch

from support.common import TINY_VIT
from ssl_modules.methods.bam import BAM
from ssl_modules.run.performance import (
    PerformanceOptions,
    channels_last_backbones,
    compile_backbones,
    set_grad_checkpointing,
)
from ssl_modules.methods.vicregl import VICRegL


def tiny_bam():
    torch.manual_seed(0)
    return BAM("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), projector_widths=[32, 16], top_k=0)


def _saved_for_backward(module, images):
    """Elements autograd keeps from the forward, and the gradients of the backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        out = module(images).global_.sum()
    out.backward()
    return sum(saved), {n: p.grad for n, p in module.backbone.named_parameters() if p.grad is not None}


def test_grad_checkpointing_keeps_fewer_activations_and_the_same_gradients():
    images = torch.randn(2, 3, 32, 32)
    plain_saved, expected = _saved_for_backward(tiny_bam().eval(), images)
    module = tiny_bam().eval()
    set_grad_checkpointing(module)
    saved, got = _saved_for_backward(module, images)
    assert saved < plain_saved / 5, (saved, plain_saved)
    assert got.keys() == expected.keys() and len(got) > 10
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], msg=name)


def test_a_failing_compile_warns_and_runs_eagerly(monkeypatch):
    module = tiny_bam()
    images = torch.randn(2, 3, 32, 32)
    expected = module(images).global_

    def broken(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    compile_backbones(module)
    with pytest.warns(UserWarning, match="torch.compile of Backbone failed .*no compiler here.*eagerly"):
        got = module(images).global_
    torch.testing.assert_close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(images)  # the fallback is permanent: no second warning
    assert set(module.state_dict()) == set(tiny_bam().state_dict())  # compiled in place: same keys


def test_channels_last_converts_cnn_weights_only():
    module = VICRegL("convnext_atto", expander_widths="32-32", projector_widths="16-16", num_matches=(4, 2))
    channels_last_backbones(module)
    conv = module.backbone.model.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    vit = tiny_bam()
    channels_last_backbones(vit)
    assert vit.backbone.model.patch_embed.proj.weight.is_contiguous()


def test_callback_applies_the_options_at_fit_setup():
    module = tiny_bam()
    PerformanceOptions(grad_checkpointing=True).setup(pl.Trainer(logger=False), module, "fit")
    assert module.backbone.model.grad_checkpointing
