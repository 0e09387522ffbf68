"""A run on two "nodes" (two launches on this machine, one process each, the way ``torchrun --nnodes 2`` or
SLURM starts them) equals the 2-process run on one node, step for step (docs/resume.md, multi-node)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.real_run_testkit import REPO, callback_entry, fit_args

DDP_CPU = ["--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.enable_checkpointing=false"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(arguments: list[str], environment: dict[str, str]) -> subprocess.Popen:
    paths = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **environment}
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK"):
        env.pop(name, None)  # a launch of its own, not a rank of the pytest run
    return subprocess.Popen([sys.executable, "-m", "ssl_modules", *arguments], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]


def run(root: Path, nodes: int) -> dict:
    """The VICRegL tiny config on 2 processes: one node of 2 devices, or 2 nodes of 1 device each."""
    recorder = callback_entry("support.resume_testkit.LossRecorder", {"path": str(root / "losses.pt")})
    arguments = fit_args("vicregl", root, optional=False, extra=[*DDP_CPU, recorder,
                                                                 f"--trainer.devices={2 // nodes}",
                                                                 f"--trainer.num_nodes={nodes}"])
    port = str(free_port())
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    processes = [launch(arguments, {**rendezvous, "NODE_RANK": str(node)}) for node in range(nodes)]
    for process in processes:
        finish(process)
    return torch.load(root / "losses.pt", weights_only=False)


@pytest.mark.slow
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path):
    one_node = run(tmp_path / "one_node", nodes=1)
    two_nodes = run(tmp_path / "two_nodes", nodes=2)
    assert one_node["global_step"] == two_nodes["global_step"] == 8  # 256 images, 2 x 16 per step, 2 epochs
    assert two_nodes["losses"] == pytest.approx(one_node["losses"], rel=1e-6)
    for name, tensor in one_node["state"].items():
        torch.testing.assert_close(two_nodes["state"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)
