"""The multi-node recipes of docs/distributed.md, run as documented on one machine: the ``torchrun`` command on
2 "nodes" and the ``srun`` line's program under a simulated SLURM job of 2 nodes (requeue on SIGUSR1, then the
same command resumes) both give the 2-process single-node run, step for step."""
from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import pytest
import torch

from support.launch_recipes import (
    TINY_CONFIG,
    documented_line,
    expand,
    fake_scontrol,
    free_port,
    slurm_task_environment,
    srun_program,
    start,
    tiny_overrides,
    torchrun_program,
    wait_all,
)

NODES, STEPS = 2, 8  # 2 nodes of 1 process; 256 images, 2 x 32 per step, 2 epochs
SIGNAL_STEP, STOP_STEP = 5, 6  # every rank agrees on a signal one batch after it arrives


def assert_same_run(reference: dict, losses: dict[int, float], final: dict) -> None:
    assert final["global_step"] == reference["global_step"] == STEPS
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert loss == pytest.approx(reference["losses"][step], rel=1e-6), f"step {step}"
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(final["state"][name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def finished(processes, codes: tuple[int, ...] = (0,)) -> str:
    """Wait for every launch; each must exit with one of ``codes``. Returns their outputs' tails, joined."""
    outputs = []
    for code, output in wait_all(processes):
        assert code in codes, f"exit code {code}:\n{output}"
        outputs.append(output)
    return "\n".join(outputs)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> dict:
    """The reference: the tiny config on one node of 2 processes."""
    root = tmp_path_factory.mktemp("one_node")
    argv = [sys.executable, "-m", "ssl_modules", "fit", "--config", str(TINY_CONFIG), "--trainer.devices=2",
            *tiny_overrides(root / "run", root / "run.pt")]
    finished([start(argv, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, root)])
    return torch.load(root / "run.pt", weights_only=False)


# ------------------------------------------------------------------------------------ the page itself
def test_the_sbatch_script_asks_for_requeue_on_sigusr1_and_resumes_from_the_last_checkpoint():
    block, line = documented_line("srun")
    assert "#SBATCH --requeue" in block
    assert "#SBATCH --signal=SIGUSR1@90" in block
    words = expand(line, {"CONFIG": "c.yaml", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"})
    assert words[:5] == ["srun", "python", "-m", "ssl_modules", "fit"]
    assert words[-2:] == ["--ckpt_path", "last"]
    assert ["--trainer.num_nodes", "2"] == words[words.index("--trainer.num_nodes"):][:2]


def test_the_torchrun_command_names_nodes_node_rank_and_the_rendezvous():
    _, line = documented_line("torchrun")
    words = expand(line, {"NODES": "2", "GPUS_PER_NODE": "8", "NODE_RANK": "1", "MASTER_ADDR": "h",
                          "MASTER_PORT": "1", "CONFIG": "c.yaml"})
    for option in ("--nnodes", "--nproc_per_node", "--node_rank", "--master_addr", "--master_port"):
        assert option in words, option
    assert words[words.index("-m") + 1:][:2] == ["ssl_modules", "fit"]
    assert words[-2:] == ["--ckpt_path", "last"]


# ----------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_recipe_on_two_nodes_equals_the_two_process_run(two_process_run, tmp_path):
    _, line = documented_line("torchrun")
    port, record = str(free_port()), tmp_path / "torchrun.pt"
    launches = []
    for node in range(NODES):
        words = expand(line, {"NODES": str(NODES), "GPUS_PER_NODE": "1", "NODE_RANK": str(node),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "CONFIG": str(TINY_CONFIG)})
        launches.append(start(torchrun_program(words) + tiny_overrides(tmp_path / "run", record), {}, tmp_path))
    finished(launches)
    run = torch.load(record, weights_only=False)
    assert_same_run(two_process_run, run["losses"], run)


# -------------------------------------------------------------------------------------------- SLURM
def slurm_job(line: str, root: Path, record: Path, job_id: str, signal_step: int | None = None) -> list:
    """The documented ``srun`` line's program in each of the job's 2 tasks (one per "node")."""
    bin_dir = root / "bin"
    variables = {"CONFIG": str(TINY_CONFIG), "SLURM_NNODES": str(NODES), "SLURM_NTASKS_PER_NODE": "1"}
    program = srun_program(expand(line, variables))
    overrides = tiny_overrides(root / "run", record, signal_step, int(signal.SIGUSR1))
    return [start(program + overrides, slurm_task_environment(task, 1, NODES, job_id, "pretrain", bin_dir), root)
            for task in range(NODES)]


@pytest.mark.slow
def test_slurm_recipe_requeues_on_sigusr1_and_the_requeued_job_resumes_to_the_two_process_run(
        two_process_run, tmp_path):
    _, line = documented_line("srun")
    calls = tmp_path / "scontrol.calls"
    fake_scontrol(tmp_path / "bin", calls)
    job_id = f"7{free_port(15000, 25000) - 15000:04d}"  # Lightning's SLURM port: 15000 + the id's last 4 digits

    finished(slurm_job(line, tmp_path, tmp_path / "first.pt", job_id, SIGNAL_STEP), codes=(128 + signal.SIGUSR1,))
    assert calls.read_text().split() == ["requeue", job_id]
    hpc = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    first = torch.load(tmp_path / "first.pt", weights_only=False)
    assert hpc["global_step"] == first["global_step"] == STOP_STEP

    output = finished(slurm_job(line, tmp_path, tmp_path / "second.pt", job_id))  # the requeued job: same command
    picked = re.search(r"--ckpt_path last: resuming (\S+)", output)  # hpc_ckpt_1 or a checkpoint written with it
    assert picked, output
    assert torch.load(picked.group(1), map_location="cpu", weights_only=True)["global_step"] == STOP_STEP
    second = torch.load(tmp_path / "second.pt", weights_only=False)
    assert min(second["losses"]) == STOP_STEP + 1
    assert_same_run(two_process_run, {**first["losses"], **second["losses"]}, second)
