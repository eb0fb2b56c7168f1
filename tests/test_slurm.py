"""scripts/slurm.sbatch as SLURM runs it, with srun and scontrol played by small scripts: a SIGTERM before the time
limit writes last.ckpt and requeues the job, and the requeued job resumes from it and finishes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUICK, REPO, finish, shell_env, start

pytestmark = pytest.mark.slow

# srun: run the task; once its first last.ckpt exists, send it SIGTERM, as --signal=TERM@120 does before the limit.
SRUN_THAT_SIGNALS = """#!/bin/bash
"$@" & task=$!
while [ ! -e logs/version_0/checkpoints/last.ckpt ] && kill -0 $task 2>/dev/null; do sleep 0.1; done
kill -TERM $task
wait $task
"""
SRUN = '#!/bin/bash\nexec "$@"\n'  # the requeued job: SLURM runs the task to the end
SCONTROL = '#!/bin/bash\necho "$@" >> scontrol.log\n'
# Small enough for a CPU: one process, 32-true (the script's bf16-mixed is for GPUs), three epochs of 4 steps.
ARGS = [*QUICK, "--trainer.max_epochs=3", "--trainer.accelerator=cpu", "--trainer.precision=32-true"]


def sbatch(job: Path, srun: str) -> subprocess.CompletedProcess:
    tools = job / "bin"
    tools.mkdir(exist_ok=True)
    for name, text in (("srun", srun), ("scontrol", SCONTROL)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    env = shell_env(
        PATH=f"{tools}{os.pathsep}{os.environ['PATH']}",
        VENV=str(Path(sys.executable).parents[1]),
        SLURM_SUBMIT_DIR=str(job),
        SLURM_JOB_ID="4242",
        SLURM_NNODES="1",
        SLURM_NTASKS_PER_NODE="1",
    )
    (result,) = finish([start(["bash", str(REPO / "scripts" / "slurm.sbatch"), *ARGS], job, env)], deadline=300)
    return result


def test_sigterm_before_the_limit_requeues_and_the_next_start_resumes(tmp_path: Path) -> None:
    for name in ("train.py", "configs"):  # sbatch runs from the folder the job was submitted from
        (tmp_path / name).symlink_to(REPO / name)
    stopped = sbatch(tmp_path, SRUN_THAT_SIGNALS)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "--ckpt_path auto: no last.ckpt under logs; starting a new run" in stopped.stderr
    assert "stopped by SIGTERM at step" in stopped.stderr and "Traceback" not in stopped.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    resumed = sbatch(tmp_path, SRUN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path auto: resuming from logs/version_0/checkpoints/last.ckpt" in resumed.stderr
    assert "test/acc" in resumed.stdout
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # not requeued again
