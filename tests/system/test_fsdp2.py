"""FSDP2 (``ModelParallelStrategy`` through ``ssl_modules.run.sharding.FSDP2Strategy``) for every method: on 2
CPU processes (gloo) the tiny config trains exactly as under DDP, resumes exactly from its sharded checkpoint
folder, and its export is a plain timm state dict (docs/fsdp2.md). Each run is ``python -m ssl_modules fit`` in a
subprocess with the callbacks a real run has by default (ExactResume, EpochEndReductions, NonFiniteGuard)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from support.common import TINY_VIT
from support.fsdp2_testkit import EPOCHS, FSDP2, STEPS_PER_EPOCH, fit

from ssl_modules.checkpoints.reading import check_checkpoint_file, is_distributed_checkpoint, load_module
from ssl_modules.networks.backbones import Backbone
from ssl_modules.run.sharding import data_parallel_mesh, repeated_layers

METHODS = ["cribo", "bam", "vicregl"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Per method, its DDP and FSDP2 runs (launched on first use, shared by the tests of this file)."""
    cache: dict[str, dict[str, dict]] = {}

    def get(method: str, strategy: str) -> dict:
        if strategy not in cache.setdefault(method, {}):
            root = tmp_path_factory.mktemp(f"{method}_{strategy}")
            launched = fit(method, root, FSDP2, optional=method == "cribo") if strategy == "fsdp2" else \
                fit(method, root, "ddp", checkpoints=False)
            cache[method][strategy] = {**launched, "root": root}
        return cache[method][strategy]

    return SimpleNamespace(get=get)


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_trains_as_ddp(runs, method):
    ddp, fsdp2 = runs.get(method, "ddp"), runs.get(method, "fsdp2")
    assert ddp["global_step"] == fsdp2["global_step"] == STEPS_PER_EPOCH * EPOCHS[method]
    assert fsdp2["sharded"] == sorted(fsdp2["parameters"])  # student, heads and teacher: every parameter a DTensor
    assert not ddp["sharded"]
    for step, loss in ddp["losses"].items():
        torch.testing.assert_close(fsdp2["losses"][step], loss, rtol=1e-5, atol=0, msg=f"train/loss at step {step}")
    assert_same_weights(fsdp2["state"], ddp["state"])  # student, teacher, centres, bank


#: VICRegL on a tiny timm ResNet (BatchNorm in the backbone and the heads): 64 px crops give 2 x 2 feature maps
TINY_RESNET = ["--model.init_args.backbone=test_resnet", "--model.init_args.backbone_kwargs={}",
               "--model.init_args.num_matches=[2,2]", "--data.init_args.views.init_args.global_size=64",
               "--data.init_args.views.init_args.local_size=64", "--data.init_args.eval_size=64"]


@pytest.mark.slow
def test_fsdp2_trains_a_cnn_as_ddp(tmp_path):
    ddp = fit("vicregl", tmp_path / "ddp", "ddp", checkpoints=False, extra=TINY_RESNET)
    fsdp2 = fit("vicregl", tmp_path / "fsdp2", FSDP2, checkpoints=False, extra=TINY_RESNET)
    assert fsdp2["sharded"] == sorted(fsdp2["parameters"]) and ddp["global_step"] == fsdp2["global_step"] == 4
    for step, loss in ddp["losses"].items():
        torch.testing.assert_close(fsdp2["losses"][step], loss, rtol=1e-5, atol=0, msg=f"train/loss at step {step}")
    assert_same_weights(fsdp2["state"], ddp["state"])  # BatchNorm statistics: rank 0's in both


@pytest.mark.slow
def test_probes_and_pictures_run_on_the_sharded_module(runs):
    parts = runs.get("cribo", "fsdp2")["parts"]  # the four probes and VisualDiagnostics, TensorBoard on
    assert len(parts) == 5 and all(not part["failures"] for part in parts.values()), parts
    probes = {name: part["metrics"] for name, part in parts.items() if "Probe" in name}
    assert len(probes) == 4 and all(probes.values()), probes  # each evaluated (and training equals DDP's)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_export_is_a_plain_timm_state_dict(runs, method):
    run = runs.get(method, "fsdp2")
    written, = run["root"].rglob("backbone.pt")  # by the CLI at the end of fit, in the run's log folder
    exported = torch.load(written, weights_only=True)
    assert all(type(value) is torch.Tensor for value in exported.values())
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY_VIT)
    model.load_state_dict(exported)  # strict
    prefix = "teacher.backbone.model." if method != "vicregl" else "backbone.model."
    for name, value in exported.items():
        torch.testing.assert_close(value, run["state"][prefix + name], rtol=0, atol=0)


@pytest.mark.slow
def test_fsdp2_checkpoint_folder_reads_as_one_checkpoint(runs):
    run = runs.get("cribo", "fsdp2")
    folder = run["root"] / "checkpoints" / f"step={run['global_step']}.ckpt"
    assert is_distributed_checkpoint(folder) and check_checkpoint_file(folder) == folder
    module = load_module(folder)  # what export, evaluate and load_any read
    state = module.state_dict()
    for name, value in run["state"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_fsdp2_resumes_exactly_from_its_checkpoint_folder(runs, tmp_path):
    uninterrupted = runs.get("cribo", "fsdp2")  # CrIBo: EMA teacher, centres and a bank that wraps around
    # mid-epoch (4 steps per epoch), the bank in the loss, before the first update of the prototype layers (step
    # 5): the checkpoint holds no optimizer state for them, and the resumed run must create none before step 5
    stopped_at, total = 2, uninterrupted["global_step"]
    checkpoint = uninterrupted["root"] / "checkpoints" / f"step={stopped_at}.ckpt"
    resumed = fit("cribo", tmp_path / "resumed", FSDP2, ckpt_path=checkpoint)
    assert resumed["global_step"] == total == 8
    assert sorted(resumed["losses"]) == list(range(stopped_at + 1, total + 1))
    for step, loss in resumed["losses"].items():
        torch.testing.assert_close(loss, uninterrupted["losses"][step], rtol=1e-6, atol=0, msg=f"step {step}")
    assert_same_weights(resumed["state"], uninterrupted["state"])


# ------------------------------------------------------------------------------------- the pieces, quickly

def test_repeated_layers_are_the_blocks_of_a_vit_and_the_stages_of_a_resnet():
    vit = Backbone("vit_tiny_patch16_224", **TINY_VIT)
    assert repeated_layers(vit) == list(vit.model.blocks)
    resnet = Backbone("resnet18")
    assert repeated_layers(resnet) == [resnet.model.layer1, resnet.model.layer2, resnet.model.layer3,
                                       resnet.model.layer4]
    assert repeated_layers(torch.nn.Linear(2, 2)) == []


class FakeMesh:
    """The two-dimensional mesh of ModelParallelStrategy: (data_parallel, tensor_parallel)."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, data: int, tensor: int) -> None:
        self.sizes = {"data_parallel": data, "tensor_parallel": tensor}

    def __getitem__(self, name: str):
        return SimpleNamespace(size=lambda: self.sizes[name], name=name)


def test_the_data_parallel_mesh_is_sharded_over():
    assert data_parallel_mesh(FakeMesh(4, 1)).name == "data_parallel"


def test_tensor_parallelism_is_refused_with_the_setting_to_use():
    with pytest.raises(ValueError, match="tensor_parallel size 2.*FSDP2Strategy"):
        data_parallel_mesh(FakeMesh(1, 2))


def test_a_plain_path_is_not_a_distributed_checkpoint(tmp_path: Path):
    (tmp_path / "meta.pt").write_bytes(b"")
    assert not is_distributed_checkpoint(tmp_path)  # no .metadata of torch's distributed checkpoint
    assert not is_distributed_checkpoint(tmp_path / "meta.pt")


def test_sync_batchnorm_reaches_the_strategy():
    from lightning.pytorch import Trainer
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    from ssl_modules.run.sharding import FSDP2Strategy

    trainer = Trainer(strategy=FSDP2Strategy(), accelerator="cpu", devices=2, sync_batchnorm=True, logger=False)
    assert isinstance(trainer.strategy._layer_sync, TorchSyncBatchNorm)  # applied before configure_model shards
