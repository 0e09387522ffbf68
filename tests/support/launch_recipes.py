"""The launch commands of ``docs/distributed.md``, read out of its code blocks and started on this machine as
the documented launcher would start them: ``torchrun`` once per "node", and the program of an ``srun`` line
once per task with the variables ``srun`` sets (no SLURM needed)."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "distributed.md"
TINY_CONFIG = REPO / "examples" / "configs" / "vicregl" / "synthetic_tiny.yaml"

#: variables a launch inherits from pytest that would make it a rank of some other run
_FOREIGN = re.compile(r"^(SLURM_|TORCHELASTIC_|PET_)|^(RANK|LOCAL_RANK|WORLD_SIZE|GROUP_RANK|LOCAL_WORLD_SIZE|"
                      r"NODE_RANK|MASTER_ADDR|MASTER_PORT)$")


def code_blocks(path: Path = DOC, language: str = "bash") -> list[str]:
    """The bodies of the page's fenced code blocks of ``language``, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def documented_line(program: str, path: Path = DOC) -> tuple[str, str]:
    """``(block, line)``: the one command line of the page that starts with ``program`` (continuation lines
    joined) and the code block it is in."""
    found = []
    for block in code_blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(program + " "):
                found.append((block, line.strip()))
    assert len(found) == 1, f"{path.name} should hold one `{program}` command line, found {len(found)}"
    return found[0]


def expand(line: str, variables: dict[str, str]) -> list[str]:
    """The command's words after the shell would replace ``$NAME`` / ``${NAME}`` by ``variables``; a variable
    the test does not set fails, naming it."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"the documented command uses ${name}, which the test does not set"
        return variables[name]

    return shlex.split(re.sub(r"\$\{(\w+)\}|\$(\w+)", value, line))


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A port in ``[low, high)`` that nothing listens on now."""
    for port in range(low + os.getpid() % 997, high):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def callback_argument(class_path: str, init_args: dict[str, Any]) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def tiny_overrides(root: Path, record: Path, signal_step: int | None = None, signum: int = 10) -> list[str]:
    """What the test adds after the documented arguments: a CPU run of the tiny config for 2 epochs (256 images,
    4 steps per epoch on 2 processes), its folder, rank 0 recording losses and final tensors to ``record``,
    and optionally ``signum`` sent to every process at the end of step ``signal_step`` (what SLURM's
    ``--signal`` does: every task gets it)."""
    arguments = [
        "--trainer.accelerator=cpu", "--trainer.strategy=ddp", f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.init_args.scene.num_train=256",
        "--data.init_args.scene.num_val=32", "--data.init_args.num_workers=0",
        callback_argument("support.resume_testkit.LossRecorder", {"path": str(record)}),
    ]
    if signal_step is not None:
        arguments += [callback_argument("support.resume_testkit.SignalAt",
                                        {"step": signal_step, "signum": signum, "rank": rank}) for rank in (0, 1)]
    return arguments


def environment(extra: dict[str, str]) -> dict[str, str]:
    """This machine's environment without any rank variables, the test helpers importable, plus ``extra``."""
    own = {name: value for name, value in os.environ.items() if not _FOREIGN.search(name)}
    paths = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return {**own, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def start(argv: list[str], extra_env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=environment(extra_env), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_all(processes: list[subprocess.Popen], timeout: int = 300) -> list[tuple[int, str]]:
    """Each process's exit code and output tail, once all have ended (the others are killed on a timeout)."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            results.append((process.returncode, output[-4000:]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def torchrun_program(words: list[str]) -> list[str]:
    """``torchrun ARGS`` as this interpreter runs it (``python -m torch.distributed.run ARGS``)."""
    assert words[0] == "torchrun"
    return [sys.executable, "-m", "torch.distributed.run", *words[1:]]


def srun_program(words: list[str]) -> list[str]:
    """The program an ``srun [options] python ...`` line starts in every task, on this interpreter."""
    assert words[0] == "srun"
    program = words.index("python")
    return [sys.executable, *words[program + 1:]]


def slurm_task_environment(task: int, tasks_per_node: int, nodes: int, job_id: str, job_name: str,
                           bin_dir: Path) -> dict[str, str]:
    """The variables ``srun`` sets in task ``task`` of a job of ``nodes`` x ``tasks_per_node`` tasks on this
    machine (every "node" is 127.0.0.1), with ``bin_dir`` (a fake ``scontrol``) first on ``PATH``."""
    return {
        "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": job_name, "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task % tasks_per_node), "SLURM_NODEID": str(task // tasks_per_node),
        "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_NODELIST": "127.0.0.1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }


def fake_scontrol(bin_dir: Path, calls: Path) -> None:
    """An ``scontrol`` on ``bin_dir`` that appends its arguments to ``calls`` and succeeds."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(0o755)
