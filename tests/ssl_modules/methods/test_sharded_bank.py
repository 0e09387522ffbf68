"""The sharded CrIBo memory bank against the replicated ring on 2 and 4 gloo processes: same neighbours (logical
indices), cycle masks, neighbour rows and logical bank at every step, with wrap-around and images without
objects; 1/world of the rows per process; its checkpoint layout (the replicated one) at any world size."""
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import MultiCropViews, SceneConfig, SyntheticScenesDataModule
from ssl_modules import CrIBo
from ssl_modules.methods.memory_bank import ObjectMemoryBank
from ssl_modules.methods.sharded_bank import ShardedObjectMemoryBank
from support.common import TINY_VIT, quiet_trainer_kwargs
from support.distributed_utils import run_distributed

K, D = 3, 8


def _global_batch(step: int, images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's gathered batch (identical on every process): random objects, some clusters missing, one
    image without any object and one with all."""
    generator = torch.Generator().manual_seed(1000 + step)
    objects = torch.randn(2, images, K, D, generator=generator, dtype=torch.float64)
    valid = torch.rand(images, K, generator=generator) < 0.6
    valid[step % images] = False
    valid[(step + 1) % images] = True
    return objects, valid


def _logical_valid_part(bank) -> tuple[torch.Tensor, torch.Tensor]:
    logical = bank.logical()
    rows = int(logical["counts"].sum())
    return logical["bank"][:, :rows].cpu(), logical["counts"].cpu()


def _compare_with_replicated(rank: int, world: int, slots: int, batch: int | list[int], steps: int,
                             normalized: bool) -> dict:
    """``batch``: images per process, or one number per step (all processes alike, as the gathers need)."""
    replicated = ObjectMemoryBank(slots, K, D, normalized=normalized, seed=3).double()
    sharded = ShardedObjectMemoryBank.from_replicated(replicated)
    batches = batch if isinstance(batch, list) else [batch] * steps
    local_rows, accepted = [], 0
    for step, batch in enumerate(batches):
        mine = slice(rank * batch, (rank + 1) * batch)
        groups = torch.arange(batch).repeat_interleave(K) // max(1, batch // 2)
        objects, valid = _global_batch(step, batch * world)
        queries, query_valid = objects[:, mine].reshape(2, batch * K, D), valid[mine].reshape(-1)
        expected = replicated.search(queries, query_valid=query_valid, query_groups=groups, chunk_size=5)
        got = sharded.search(queries, query_valid=query_valid, query_groups=groups, chunk_size=5)
        assert torch.equal(got["mask"], expected["mask"]), step
        expected_logical = (expected["indices"] - replicated.row_head) % replicated.capacity
        assert torch.equal(got["indices"][:, query_valid], expected_logical[:, query_valid]), step
        torch.testing.assert_close(got["neighbours"][:, query_valid], expected["neighbours"][:, query_valid],
                                   rtol=1e-14, atol=0)
        accepted += int(got["mask"].sum())

        replicated.enqueue_(objects, valid)
        sharded.enqueue_local_(objects[:, mine], valid[mine])
        want_bank, want_counts = _logical_valid_part(replicated)
        got_bank, got_counts = _logical_valid_part(sharded)
        assert torch.equal(got_counts, want_counts), step
        torch.testing.assert_close(got_bank, want_bank, rtol=1e-14, atol=0)
        local_rows.append(sharded.local_rows)
    return {"local_rows": local_rows, "accepted": accepted, "batch": batch}


FOUR = pytest.mark.slow  # starting 4 worker processes on 2 cores takes ~45 s (once per session)


@pytest.mark.parametrize("world, slots, batch", [(2, 10, 2), pytest.param(4, 9, 1, marks=FOUR),
                                                 pytest.param(4, 11, 2, marks=FOUR)])
def test_sharded_bank_equals_the_replicated_bank_at_every_step(world, slots, batch):
    # 3 * slots / (world * batch) + 2 steps: the bank is refilled (and both rings wrap) about three times
    steps = 3 * slots // (world * batch) + 2
    results = run_distributed(_compare_with_replicated, world, (slots, batch, steps, True))
    assert sum(r["accepted"] for r in results) > 0  # cycles close: the masks compared are not all False


def test_batches_of_changing_size_grow_the_ring_where_needed_and_stay_equal():
    # a first step of 1 image per process sizes the ring for it; the larger steps after it need more slots
    batches = [1, 3, 3, 1, 2, 3, 3, 1, 1, 3]
    results = run_distributed(_compare_with_replicated, 2, (12, batches, len(batches), True))
    assert results[0]["local_rows"][0] < max(results[0]["local_rows"])


def test_sharded_bank_equals_the_replicated_bank_without_normalized_matching():
    run_distributed(_compare_with_replicated, 2, (10, 2, 8, False))


@pytest.mark.parametrize("world, slots, batch", [(2, 10, 2), pytest.param(4, 11, 2, marks=FOUR)])
def test_each_process_holds_its_share_of_the_rows(world, slots, batch):
    results = run_distributed(_compare_with_replicated, world, (slots, batch, 2, True))
    initial_slots = math.ceil(slots / world)  # until the first enqueue: the initial bank dealt out
    steady_slots = math.ceil(slots / (world * batch)) * batch
    for r in results:
        assert r["local_rows"] == [steady_slots * K] * 2
    assert steady_slots >= initial_slots


def _search_all_padding(rank: int, world: int) -> dict:
    """Queries whose image has no object (zero rows, as CrIBo pads them) and a bank without valid rows."""
    replicated = ObjectMemoryBank(4, K, D, seed=1)
    replicated.counts.zero_()
    sharded = ShardedObjectMemoryBank.from_replicated(replicated)
    got = sharded.search(torch.zeros(2, K, D), query_valid=torch.zeros(K, dtype=torch.bool))
    return {"mask": got["mask"], "indices": got["indices"]}


def test_a_sharded_bank_without_valid_rows_accepts_no_match():
    for result in run_distributed(_search_all_padding, 2):
        assert not result["mask"].any()
        assert torch.equal(result["indices"], torch.zeros(2, K, dtype=torch.long))  # the reference's index 0


def _state_dict_round_trip(rank: int, world: int, load_world: int) -> dict:
    """Train a sharded bank a few steps, save its state dict (a collective), load it at ``load_world``
    processes (simulated on this process) and in a replicated bank."""
    slots, batch = 10, 2
    replicated = ObjectMemoryBank(slots, K, D, seed=3).double()
    sharded = ShardedObjectMemoryBank.from_replicated(replicated)
    mine = slice(rank * batch, (rank + 1) * batch)
    for step in range(4):
        objects, valid = _global_batch(step, batch * world)
        replicated.enqueue_(objects, valid)
        sharded.enqueue_local_(objects[:, mine], valid[mine])
    state = sharded.state_dict()
    restored = ObjectMemoryBank(slots, K, D, seed=99).double()
    restored.load_state_dict(state)
    shards = []
    for other in range(load_world):
        shard = ShardedObjectMemoryBank(slots, K, D, world_size=load_world, rank=other, dtype=torch.float64)
        shard.load_state_dict(state)
        shards.append(shard)
    return {"want": _logical_valid_part(replicated), "restored": _logical_valid_part(restored),
            "shard_rows": [int(s._row_valid().sum()) for s in shards], "keys": sorted(state)}


@pytest.mark.parametrize("load_world", [2, 3])
def test_state_dict_is_the_replicated_layout_and_reshards_at_any_world_size(load_world):
    result = run_distributed(_state_dict_round_trip, 2, (load_world,))[0]
    assert result["keys"] == sorted(["keys", "norms", "counts", "row_head", "slot_head"])
    assert torch.equal(result["restored"][1], result["want"][1])
    torch.testing.assert_close(result["restored"][0], result["want"][0], rtol=1e-14, atol=0)
    assert sum(result["shard_rows"]) == int(result["want"][1].sum())  # every valid row in exactly one shard


def test_a_replicated_checkpoint_of_another_size_is_refused_with_the_reason():
    shard = ShardedObjectMemoryBank(10, K, D, world_size=2, rank=0)
    state = ObjectMemoryBank(12, K, D).state_dict()
    with pytest.raises(RuntimeError, match="queue_size, num_clusters or width"):
        shard.load_state_dict(state)


# ------------------------------------------------------------------------------- CrIBo under DDP (ddp_spawn)
class RecordRun(pl.Callback):
    """Every rank writes its per-step losses and, at the end, the logical bank and its shard size."""

    def __init__(self, out: str) -> None:
        self.out, self.losses, self.broadcast = out, [], []

    def on_train_start(self, trainer, pl_module) -> None:
        # the bank tensors DDP broadcasts from rank 0 at every forward (the buffers it does not ignore)
        self.broadcast = [name for name in trainer.strategy.model.named_module_buffers if "memory_bank" in name]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        bank = pl_module.memory_bank
        logical = bank.logical()  # a collective for the sharded bank: every rank calls it
        rows = int(logical["counts"].sum())
        torch.save({"losses": self.losses, "bank": logical["bank"][:, :rows].cpu(), "counts": logical["counts"].cpu(),
                    "sharded": isinstance(bank, ShardedObjectMemoryBank), "broadcast": self.broadcast,
                    "local_rows": getattr(bank, "local_rows", bank.capacity)},
                   f"{self.out}/rank{trainer.global_rank}.pt")


def _fit_cribo(rank: int, world: int, root: str, name: str, sharding: str, steps: int,
               ckpt_path: str | None = None) -> dict:
    """A tiny CrIBo fit under Lightning's ``ddp`` on the pool's processes (launched externally, as torchrun
    does), a checkpoint every 2 steps in ``root/name``; returns what :class:`RecordRun` wrote for this rank."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # the process group exists already
    pl.seed_everything(0)
    module = CrIBo("vit_tiny_patch16_224", backbone_kwargs=dict(TINY_VIT), out_dim=64, object_out_dim=64,
                   head_hidden_dim=64, head_bottleneck_dim=32, num_clusters=4, queue_size=12,
                   cross_image_start_epoch=0, lr_scaling="none", warmup_epochs=0, memory_bank_sharding=sharding)
    views = MultiCropViews(n_global=2, n_local=0, global_size=32, jitter_p=0.0, grayscale_p=0.0)
    # 2 processes x batch 4 = 8 images per step through 12 slots: the bank is refilled every 1.5 steps
    data = SyntheticScenesDataModule(root=f"{root}/data", scene=SceneConfig(image_size=48, num_train=16, num_val=8),
                                     eval_size=32, batch_size=4, num_workers=0, views=views, generation_workers=1)
    out = Path(root) / name
    saving = ModelCheckpoint(dirpath=str(out), filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(**quiet_trainer_kwargs(devices=world, strategy="ddp", max_steps=steps, limit_val_batches=0,
                                                enable_checkpointing=True, callbacks=[RecordRun(str(out)), saving]))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return torch.load(out / f"rank{rank}.pt")


def test_cribo_with_a_sharded_bank_trains_as_with_the_replicated_bank_and_resumes(tmp_path):
    root = str(tmp_path)
    sharded = run_distributed(_fit_cribo, 2, (root, "sharded", "auto", 4))
    replicated = run_distributed(_fit_cribo, 2, (root, "replicated", "replicated", 4))
    resumed = run_distributed(_fit_cribo, 2, (root, "resumed", "sharded", 4, f"{root}/sharded/step=2.ckpt"))
    for rank in range(2):
        assert sharded[rank]["sharded"] and not replicated[rank]["sharded"]
        # DDP never overwrites a shard, nor copies rank 0's replicated bank onto the identical others every step
        assert sharded[rank]["broadcast"] == [] and replicated[rank]["broadcast"] == []
        assert sharded[rank]["local_rows"] == math.ceil(12 / 8) * 4 * 4  # ceil(S / G) * B slots of K rows
        torch.testing.assert_close(sharded[rank]["losses"], replicated[rank]["losses"], rtol=1e-5, atol=0)
        assert torch.equal(sharded[rank]["counts"], replicated[rank]["counts"])
        torch.testing.assert_close(sharded[rank]["bank"], replicated[rank]["bank"], rtol=1e-5, atol=1e-6)
        # resumed after step 2: steps 3 and 4 as the uninterrupted run, and the same bank at the end
        torch.testing.assert_close(resumed[rank]["losses"], sharded[rank]["losses"][2:], rtol=1e-5, atol=0)
        assert torch.equal(resumed[rank]["counts"], sharded[rank]["counts"])
        torch.testing.assert_close(resumed[rank]["bank"], sharded[rank]["bank"], rtol=1e-5, atol=1e-6)
    # the sharded run's checkpoint is a replicated bank's: it loads at one process (another world size)
    states = [torch.load(tmp_path / run / "step=2.ckpt", weights_only=False)["state_dict"]
              for run in ("sharded", "replicated")]
    banks = []
    for state in states:
        bank = ObjectMemoryBank(12, 4, TINY_VIT["embed_dim"])
        bank.load_state_dict({k.removeprefix("memory_bank."): v for k, v in state.items()
                              if k.startswith("memory_bank.")})
        banks.append(_logical_valid_part(bank))
    assert torch.equal(banks[0][1], banks[1][1])
    torch.testing.assert_close(banks[0][0], banks[1][0], rtol=1e-5, atol=1e-6)
