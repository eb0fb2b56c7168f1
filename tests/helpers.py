"""Shared test helpers: run the repository's scripts as a user does, under a deadline.

A process that outlives its deadline fails the test with the Python stack of every process in its tree (each
rank, each launcher, each loader worker), then the whole tree is killed: a hang is a failure with a cause, never a
stuck CI. The stacks come from ``faulthandler`` in each process (``PYTHONFAULTHANDLER=1``): the tree is frozen with
SIGSTOP, then each process in turn gets SIGABRT and SIGCONT and writes its threads' stacks to its stderr.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
# Tiny runs for in-process tests: one epoch is ~19 batches of the embedded digits. The progress bar is off here
# because these runs are single-process (the bar's output is all they would add); every multi-process test runs
# with it on, as users do.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--data.num_workers=0",
]
DEADLINE_S = 600.0
DUMP_WAIT_S = 0.5  # for one process to write its stacks after SIGABRT


def train(args: list[str], **kwargs: Any) -> Any:
    """train.py in this process: ``imgcls.cli.main`` over configs/default.yaml, as train.py calls it."""
    from imgcls.cli import main

    return main(args, config=DEFAULT_CONFIG, **kwargs)


def exit_message(args: list[str], **kwargs: Any) -> str:
    """The one line train.py (in this process) exits with."""
    import pytest

    with pytest.raises(SystemExit) as stopped:
        train(args, **kwargs)
    message = str(stopped.value.code)
    assert "\n" not in message
    return message


class Hung(AssertionError):
    """A process tree outlived its deadline; the message holds every process's stack."""


def shell_env(**extra: str) -> dict[str, str]:
    """A fresh shell's environment: no rendezvous variables left by in-process distributed tests; stacks on SIGABRT."""
    leaked = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"}
    env = {key: value for key, value in os.environ.items() if key not in leaked}
    return env | {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"} | extra


def start(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``argv`` in ``cwd``, in a process group of its own (``os.killpg`` reaches every process it starts).

    Its output goes to temporary files, so a full pipe can never block it.
    """
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 (closed by finish)
    process = subprocess.Popen(argv, cwd=cwd, env=env or shell_env(), stdout=out, stderr=err, start_new_session=True)
    process.files = (out, err)  # type: ignore[attr-defined]
    return process


def finish(processes: list[subprocess.Popen], deadline: float = DEADLINE_S) -> list[subprocess.CompletedProcess]:
    """Wait for all ``processes``; past ``deadline`` seconds, raise ``Hung`` with every process's stack."""
    end = time.monotonic() + deadline
    for process in processes:
        try:
            process.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise Hung(f"still running after {deadline:.0f} s:\n{_dump_and_kill(processes)}") from None
    return [_completed(process) for process in processes]


def script(name: str, *args: str) -> list[str]:
    """The command line that runs the repository's script ``name`` with ``args``."""
    return [sys.executable, str(REPO / name), *args]


def run(
    name: str, *args: str, cwd: Path, deadline: float = DEADLINE_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the repository's script ``name`` as a user would, in ``cwd``, within ``deadline`` seconds."""
    return python(str(REPO / name), *args, cwd=cwd, deadline=deadline, env=env)


def python(
    *args: str, cwd: Path, deadline: float = DEADLINE_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in ``cwd`` within ``deadline`` seconds; interpreter flags (``-X importtime``) allowed."""
    (result,) = finish([start([sys.executable, *args], cwd, env)], deadline)
    # A C++ abort in a launched rank leaves rank 0's exit status untouched: look for it in the shared stderr.
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
    return result


def descendants(pid: int) -> list[int]:
    """``pid``'s children, grandchildren and so on, parents first (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state": the parent's pid
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def _completed(process: subprocess.Popen) -> subprocess.CompletedProcess:
    texts = [_read(file) for file in process.files]  # type: ignore[attr-defined]
    for file in process.files:  # type: ignore[attr-defined]
        file.close()
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def _read(file, start: int = 0) -> str:
    file.seek(start)
    return file.read().decode(errors="replace")


def _dump_and_kill(processes: list[subprocess.Popen]) -> str:
    trees = {process: [process.pid, *descendants(process.pid)] for process in processes}
    every = [pid for pids in trees.values() for pid in pids]
    _signal(every, signal.SIGSTOP)  # frozen: nothing changes while the others are dumped
    report = []
    for process, pids in trees.items():
        err = process.files[1]  # type: ignore[attr-defined]
        report.append(f"=== stderr of {_command(process.pid)} until then:\n{_read(err)[-3000:]}")
        for pid in pids:
            command, start = _command(pid), os.fstat(err.fileno()).st_size
            _signal([pid], signal.SIGABRT)  # pending until SIGCONT
            _signal([pid], signal.SIGCONT)
            time.sleep(DUMP_WAIT_S)
            report.append(f"=== stack of pid {pid}: {command}\n{_main_thread_first(_read(err, start))}")
    _signal(every + [p for pid in every for p in descendants(pid)], signal.SIGKILL)
    for process in processes:
        process.wait()
        for file in process.files:  # type: ignore[attr-defined]
            file.close()
    return "\n".join(report)


def _main_thread_first(dump: str) -> str:
    """faulthandler's dump with the main thread's stack (the one that ran a script's ``<module>``) first."""
    header, *threads = dump.strip().split("\n\n")
    threads = [stack for stack in threads if not stack.startswith("Extension modules:")]  # a list of every .so
    threads.sort(key=lambda stack: "in <module>" not in stack)
    return "\n\n".join([header, *threads]) if dump.strip() else "(none written)"


def _signal(pids: list[int], number: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, number)


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def report(workdir: Path, rank: int = 0) -> dict:
    """What tests/scripts/train_and_report.py wrote for ``rank`` in ``workdir``."""
    return json.loads((workdir / f"report_rank{rank}.json").read_text())


def logged(workdir: Path, tag: str, version: int = 0) -> dict[int, float]:
    """The scalar ``tag`` of run ``version`` under ``workdir/logs``, by step, as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "logs" / f"version_{version}"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}
