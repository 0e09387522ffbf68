"""Two CPU processes (``ddp_spawn``, gloo): both log the same value of every probe, equal to one process on
the same data (the linear probe's global batch: 2 x 8 images vs 1 x 16)."""
from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from support.probe_testkit import ColourData, ColourFeatures, SaveProbeResults, trainer_kwargs

from callbacks import DenseRetrievalProbe, KNNProbe, OnlineLinearProbe, VOCSegmentationProbe

PROBES = {"linear": "OnlineLinearProbe[linear]", "linear_loader": "OnlineLinearProbe[linear_loader]",
          "knn": "KNNProbe[knn]", "voc": "VOCSegmentationProbe[voc]", "retrieval": "DenseRetrievalProbe[retrieval]"}


def probes() -> list[pl.Callback]:
    # Embedding batches of 8 over 64 / 48 / 40 images: both processes get work, and uneven shares.
    return [
        OnlineLinearProbe(batch_size=8, lr=0.5, num_workers=0),
        # its own loader: global batches of 8, 4 images embedded by each process
        OnlineLinearProbe(train_on="loader", batch_size=8, lr=0.5, num_workers=0, name="linear_loader"),
        KNNProbe(k=5, batch_size=8, train_fraction=0.75, max_val_images=40, num_workers=0),
        VOCSegmentationProbe(steps=20, batch_size=8, lr=0.05, max_train_images=48, max_val_images=40,
                             num_logged_images=0, num_workers=0),
        DenseRetrievalProbe(k=10, batch_size=8, patches_per_image=10, max_train_images=48, max_val_images=40,
                            num_workers=0),
    ]


def run(folder, devices: int, batch_size: int) -> list[dict]:
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = pl.Trainer(callbacks=[*probes(), SaveProbeResults(folder)],
                         **trainer_kwargs(devices=devices, strategy=strategy, max_epochs=2,
                                                        use_distributed_sampler=False))
    trainer.fit(ColourFeatures(), datamodule=ColourData(batch_size=batch_size, noise=4.0))
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # Lightning gives each of the 2 CPU processes 1 thread; the reference runs with 1 thread too (a
    # multi-threaded reduction sums in another order and changes the last bits of BatchNorm statistics).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(tmp_path_factory.mktemp("single"), devices=1, batch_size=16)[0]
    finally:
        torch.set_num_threads(threads)
    ranks = run(tmp_path_factory.mktemp("ddp"), devices=2, batch_size=8)
    return single, ranks


def assert_same_state(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("probe", list(PROBES))
def test_both_processes_log_the_single_process_value(results, probe):
    single, ranks = results
    key = PROBES[probe]
    expected = single["probes"][key]["metrics"]
    assert expected, f"{probe} did not evaluate"
    for rank in ranks:
        assert rank["probes"][key]["metrics"] == expected  # computed values, bit for bit
        for metric, value in expected.items():
            assert rank["logged"][f"probe/{probe}_{metric}"] == pytest.approx(value, abs=1e-7)


@pytest.mark.parametrize("probe", ["linear", "linear_loader", "voc"])
def test_trained_heads_are_identical_on_both_processes_and_to_one_process(results, probe):
    single, ranks = results
    key = PROBES[probe]
    for rank in ranks:
        assert_same_state(rank["probes"][key]["state"], single["probes"][key]["state"])


def test_the_values_are_not_trivial(results):
    metrics = results[0]["probes"]
    assert 0.3 < metrics[PROBES["linear"]]["metrics"]["top1"] <= 1.0
    assert 0.3 < metrics[PROBES["knn"]]["metrics"]["top1"] <= 1.0


def _fast_path_run(folder, devices: int, batch_size: int) -> list[dict]:
    folder.mkdir()
    strategy = "ddp_spawn" if devices > 1 else "auto"
    probe = OnlineLinearProbe(train_on="batches", batch_size=8, lr=0.5, num_workers=0)
    trainer = pl.Trainer(callbacks=[probe, SaveProbeResults(folder)],
                         **trainer_kwargs(devices=devices, strategy=strategy, max_epochs=1,
                                          use_distributed_sampler=False))
    trainer.fit(ColourFeatures(return_embedding=True), datamodule=ColourData(batch_size=batch_size, noise=4.0))
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.mark.slow
def test_linear_probe_on_the_steps_embedding_is_the_same_under_ddp(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _fast_path_run(tmp_path / "single", 1, 16)[0]
    finally:
        torch.set_num_threads(threads)
    key = "OnlineLinearProbe[linear]"
    for rank in _fast_path_run(tmp_path / "ddp", 2, 8):
        assert rank["probes"][key]["metrics"] == single["probes"][key]["metrics"]
        assert_same_state(rank["probes"][key]["state"], single["probes"][key]["state"])
