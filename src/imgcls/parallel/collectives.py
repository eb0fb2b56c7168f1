"""Collectives that cannot complete: a timeout that ends them, and a one-line account of which one, and where.

Every process of a run must call the same collectives in the same order. When one does not (it died, hangs, or
runs other code), the others wait in their collective until the process group's timeout raises there. Lightning
leaves that timeout at PyTorch's 30 minutes; ``--collective_timeout`` sets it.
"""

import os
import re
import sys
import sysconfig
import threading
import traceback
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch.strategies import Strategy
from torch.distributed import DistError

from imgcls.compat.lightning import device_mesh, set_collective_timeout

C10D = os.path.join("torch", "distributed", "distributed_c10d.py")
DEFAULT_TIMEOUT_S = 600.0  # long enough for a slow first step or checkpoint, short enough to notice a hang
PACKAGE = str(Path(__file__).resolve().parent)  # this project's frames count as its own, installed or not
LIBRARIES = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")})


def apply_timeout(strategy: Strategy, seconds: float | None) -> None:
    """Make every collective of ``strategy``'s process group fail after ``seconds`` (``None``: the strategy's own)."""
    if seconds is not None:
        set_collective_timeout(strategy, timedelta(seconds=seconds))


def close(strategy: Strategy) -> None:
    """End a finished run's process groups; a no-op without one.

    gloo's worker threads free a collective's tensors after the caller has moved on, and need the GIL for it. Still
    waiting for it when the interpreter exits, they abort the finished run ("terminate called without an active
    exception"). Waiting in a barrier of every group (the default one, and the device meshes' that FSDP2 uses)
    releases the GIL to them first.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    meshes = [mesh for mesh in (device_mesh(strategy), getattr(strategy, "shard_mesh", None)) if mesh is not None]
    for group in [None, *(group for mesh in meshes for group in mesh.get_all_groups())]:
        dist.barrier(group)
    dist.destroy_process_group()


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed: raised by a torch.distributed call or by the gloo/NCCL backend."""
    if isinstance(error, DistError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    in_c10d = bool(frames) and frames[-1].filename.endswith(C10D)  # e.g. work.wait() in all_reduce
    return isinstance(error, RuntimeError) and (in_c10d or any(name in str(error) for name in ("/gloo/", "NCCL")))


def describe_failure(error: BaseException, seconds: float | None) -> str:
    """One line for a collective that failed: the operation, the code that called it, and what to do."""
    reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)  # the backend's source file and line
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    limit = f"--collective_timeout {seconds:g} s" if seconds is not None else "the process group's timeout"
    return (
        f"rank {rank}: {where(traceback.extract_tb(error.__traceback__))} failed: {reason}; another process "
        f"stopped, or did not reach the same collective within {limit} (its own output says why)"
    )


def where(frames: traceback.StackSummary) -> str:
    """``op (called from file:line in function)``: the innermost torch.distributed call and the code that made it."""
    ops = [frame for frame in frames if frame.filename.endswith(C10D)]
    op = ops[-1].name if ops else (frames[-1].name if frames else "?")
    ours = [frame for frame in frames if frame.filename.startswith(PACKAGE) or not frame.filename.startswith(LIBRARIES)]
    caller = ours[-1] if ours else None
    if caller is None:
        return op
    path = Path(caller.filename).resolve()
    shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    return f"{op} (called from {shown}:{caller.lineno} in {caller.name})"


def main_thread_stack() -> traceback.StackSummary:
    """Where the main thread is now, as a stack summary (for another thread to report on it)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    return traceback.extract_stack(frame) if frame is not None else traceback.StackSummary()
