"""Memory and step time of CrIBo's sharded memory bank against the replicated one, on CPU processes (gloo).

    python benchmarks/sharded_bank.py                      # S=2048 images x K=16 objects x D=128, B=32 per process
    python benchmarks/sharded_bank.py --slots 4096 --dim 384 --worlds 1 2 4 --json out.json

For each world size W (W processes, one thread each): the bank's bytes per process (the tensors each process
keeps: replicated = the whole ``ObjectMemoryBank``; sharded = its shard, the per-image counts of all S images
and its ring's bookkeeping) and the median time of one CrIBo bank step per process, the slowest process
counted: replicated = all-gather of the batch's objects and masks + search of the local queries in the whole
bank + enqueue; sharded = all-gather of the queries + search of the shard + best-of-processes + all-to-all of
the neighbours + cycle test + local enqueue (with the gather of the counts). Both banks are built in the same
run from the same initial state and fed the same batches; ratios are sharded / replicated. The times of W
processes on fewer cores than W share those cores: compare them within one world size, not across.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_modules.methods.memory_bank import ObjectMemoryBank  # noqa: E402
from ssl_modules.methods.sharded_bank import ShardedObjectMemoryBank  # noqa: E402
from ssl_modules.run import distributed  # noqa: E402


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sharded_bytes(bank: ShardedObjectMemoryBank) -> int:
    return tensor_bytes(getattr(bank, name) for name in bank._TENSORS) + bank._serials.nbytes


def batch(step: int, world: int, images: int, clusters: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's gathered batch (identical on every process)."""
    generator = torch.Generator().manual_seed(step)
    objects = torch.randn(2, world * images, clusters, dim, generator=generator)
    return objects, torch.rand(world * images, clusters, generator=generator) < 0.7


def replicated_step(bank: ObjectMemoryBank, objects: torch.Tensor, valid: torch.Tensor, rank: int) -> None:
    """What CrIBo does per step with the replicated bank: search the local queries, gather, enqueue."""
    images, clusters = valid.shape[0] // distributed.world_size(), valid.shape[1]
    mine = slice(rank * images, (rank + 1) * images)
    local, local_valid = objects[:, mine], valid[mine]
    bank.search(local.reshape(2, images * clusters, -1), query_valid=local_valid.reshape(-1))
    every = distributed.all_gather_no_grad(local.transpose(0, 1).contiguous()).transpose(0, 1)
    bank.enqueue_(every, distributed.all_gather_no_grad(local_valid))


def sharded_step(bank: ShardedObjectMemoryBank, objects: torch.Tensor, valid: torch.Tensor, rank: int) -> None:
    images, clusters = valid.shape[0] // distributed.world_size(), valid.shape[1]
    mine = slice(rank * images, (rank + 1) * images)
    bank.search(objects[:, mine].reshape(2, images * clusters, -1), query_valid=valid[mine].reshape(-1))
    bank.enqueue_local_(objects[:, mine], valid[mine])


def timed(step, bank, args, rank: int, world: int) -> list[float]:
    times = []
    for i in range(args.warmup + args.steps):
        objects, valid = batch(i, world, args.batch, args.clusters, args.dim)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        step(bank, objects, valid, rank)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    replicated = ObjectMemoryBank(args.slots, args.clusters, args.dim)
    sharded = ShardedObjectMemoryBank.from_replicated(replicated, world_size=world, rank=rank)
    result = {"replicated_bytes": tensor_bytes(replicated.buffers())}
    result["sharded_s"] = statistics.median(timed(sharded_step, sharded, args, rank, world))
    result["sharded_bytes"], result["local_slots"] = sharded_bytes(sharded), sharded.local_slots
    result["replicated_s"] = statistics.median(timed(replicated_step, replicated, args, rank, world))
    queue.put((rank, result))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for process in processes:
        process.start()
    results = dict(queue.get() for _ in processes)
    for process in processes:
        process.join()
    ranks = [results[r] for r in range(world)]
    return {
        "world": world,
        "replicated_MB": ranks[0]["replicated_bytes"] / 2**20,
        "sharded_MB": max(r["sharded_bytes"] for r in ranks) / 2**20,
        "local_slots": [r["local_slots"] for r in ranks],
        "replicated_ms": 1e3 * max(r["replicated_s"] for r in ranks),
        "sharded_ms": 1e3 * max(r["sharded_s"] for r in ranks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=2048, help="S, images in the bank")
    parser.add_argument("--clusters", type=int, default=16, help="K, objects per image")
    parser.add_argument("--dim", type=int, default=128, help="D, object width")
    parser.add_argument("--batch", type=int, default=32, help="B, images per process and step")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [measure(world, args) for world in args.worlds]
    print(f"bank: S={args.slots} images x K={args.clusters} objects x D={args.dim}, float32, 2 views; "
          f"B={args.batch} images per process; {os.cpu_count()} CPU cores, 1 thread per process")
    print(f"{'W':>3} {'replicated MB':>14} {'sharded MB':>11} {'ratio':>6} {'slots/process':>14} "
          f"{'replicated ms':>14} {'sharded ms':>11} {'ratio':>6}")
    for row in rows:
        print(f"{row['world']:>3} {row['replicated_MB']:>14.1f} {row['sharded_MB']:>11.1f} "
              f"{row['sharded_MB'] / row['replicated_MB']:>6.3f} {max(row['local_slots']):>14} "
              f"{row['replicated_ms']:>14.1f} {row['sharded_ms']:>11.1f} "
              f"{row['sharded_ms'] / row['replicated_ms']:>6.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
