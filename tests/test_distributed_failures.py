"""When a multi-process run cannot go on: a hang fails its test with every rank's stack, and a user's run ends within
the collective timeout, or at once on SIGTERM, or when another rank dies, with one line that says where."""

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import REPO, Hung, descendants, finish, run, script, shell_env, start

from imgcls.callbacks.preemption import EXIT_SIGTERM, STUCK_S

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TWO_CPU_PROCESSES = ["--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2"]
PLANTED = [*TWO_CPU_PROCESSES, "--trainer.max_epochs=2", "--trainer.limit_train_batches=3",
           "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2",
           "--trainer.callbacks+=planted.SkipOneCollective"]  # fmt: skip
PLANTED_ENV = shell_env(PYTHONPATH=str(REPO / "tests" / "scripts"))


def left_in(folder: Path) -> list[int]:
    """The processes still running in ``folder`` (their working directory)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(os.readlink(f"/proc/{entry}/cwd")) == folder:
                found.append(int(entry))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def wait_for(path: Path, process, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < end, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def test_a_hang_fails_its_test_with_the_stack_of_every_rank(tmp_path: Path) -> None:
    # The default collective timeout (10 minutes) is far beyond the test's deadline: the test itself must catch it.
    with pytest.raises(Hung) as hung:
        run("train.py", *PLANTED, cwd=tmp_path, env=PLANTED_ENV, deadline=45)
    message = str(hung.value)
    stacks = message.split("=== stack of pid ")[1:]
    ranks = [stack for stack in stacks if "train.py" in stack.splitlines()[0] and "in <module>" in stack]
    assert any("planted.py" in stack and "all_reduce" in stack for stack in ranks), message[-5000:]
    assert any("_log_metrics" in stack and "all_gather" in stack for stack in ranks), message[-5000:]
    assert not left_in(tmp_path), "the hung tree must be killed"


def test_a_hang_ends_the_run_within_the_collective_timeout_with_one_line_per_rank(tmp_path: Path) -> None:
    result = run("train.py", *PLANTED, "--collective_timeout=10", cwd=tmp_path, env=PLANTED_ENV, deadline=120)
    took = time.time() - float((tmp_path / "planted-hang-started").read_text())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert any(line.startswith("error: rank 0: all_reduce (called from ") and "planted.py" in line for line in errors)
    assert any(line.startswith("error: rank 1: all_gather (called from ") and "model.py" in line for line in errors)
    assert all("within --collective_timeout 10 s" in line for line in errors), errors
    assert 10 <= took < 40, took
    ended = time.monotonic()  # the other rank and the loader workers may take a moment more to exit; not longer
    while left_in(tmp_path) and time.monotonic() - ended < 10:
        time.sleep(0.1)
    assert not left_in(tmp_path), "processes outlived the run by 10 s"


def test_sigterm_ends_a_run_stuck_in_a_collective_at_once(tmp_path: Path) -> None:
    process = start(script("train.py", *PLANTED), tmp_path, PLANTED_ENV)
    wait_for(tmp_path / "planted-hang-started", process)
    time.sleep(2)  # well inside the hang
    sent = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)  # to the command only, as `timeout` or a scheduler sends it
    (result,) = finish([process], deadline=STUCK_S + 60)
    took = time.monotonic() - sent
    assert result.returncode == EXIT_SIGTERM, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: SIGTERM: stopped at once, without saving, after {STUCK_S:g} s stuck in all_reduce")
    assert "planted.py" in line and line.endswith("resume with --ckpt_path last")
    assert STUCK_S <= took < STUCK_S + 15, took
    end = time.monotonic() + 30
    while left_in(tmp_path):  # rank 1 ends too: its peer has gone
        assert time.monotonic() < end, "rank 1 outlived rank 0 by 30 s"
        time.sleep(0.1)


def test_killing_one_rank_ends_every_process_and_last_resumes(tmp_path: Path) -> None:
    args = [*TWO_CPU_PROCESSES, "--trainer.max_epochs=2", "--trainer.limit_train_batches=12",
            "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"]  # fmt: skip
    process = start(script("train.py", *args), tmp_path)
    last = tmp_path / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for(last, process, timeout=180)
    time.sleep(2)  # into the second epoch
    rank1 = [pid for pid in descendants(process.pid) if b"LOCAL_RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    os.kill(rank1[0], signal.SIGKILL)
    killed = time.monotonic()
    while left_in(tmp_path):
        assert time.monotonic() - killed < 30, "processes outlived a dead rank by 30 s"
        time.sleep(0.1)
    gone_after = time.monotonic() - killed
    (result,) = finish([process], deadline=10)
    assert result.returncode != 0
    print(f"every process gone {gone_after:.1f} s after kill -9 of rank 1")  # for the record (pytest -s)

    resumed = run("train.py", *args, "--ckpt_path=last", cwd=tmp_path, deadline=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--ckpt_path last: resuming from logs/version_0/checkpoints/last.ckpt" in resumed.stderr
    assert "test/acc" in resumed.stdout
