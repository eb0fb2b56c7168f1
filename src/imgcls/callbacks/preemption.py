"""SIGTERM, which schedulers send before they preempt or cancel a job: every process stops after the same training
step and the run writes ``last.ckpt``; a process stuck where no Python code runs exits at once instead.

Lightning's own SIGTERM handler runs a collective (a broadcast) inside the signal handler, on whichever process got
the signal, and then each process stops at its own next batch boundary: under DDP or FSDP they can stop at different
steps, or meet different collectives, and wait for each other forever. Here the handler only takes note. At the end
of every training (and test) step the processes agree, with one all-reduce of a flag, and all of them stop there.

A Python signal handler runs only between two bytecodes of the main thread. A process waiting in a collective that
will never complete (another process died, or runs other code) never gets there: a watchdog thread, woken by the
signal itself (``signal.set_wakeup_fd``), ends such a process ``STUCK_S`` seconds later with exit status 143 and a
line that says where it was stuck. Checkpoints are written atomically, so the last complete one stays.
"""

import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from imgcls.compat.lightning import replace_sigterm_handler, stop_as_on_sigterm
from imgcls.parallel.collectives import main_thread_stack, where

STUCK_S = 10.0  # a main thread that has not run the handler by then is waiting in C++ code: a collective, mostly
EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's status for a process ended by SIGTERM


class Preemption(L.Callback):
    """On SIGTERM, stop every process after the same step, and save ``last.ckpt`` when stopping a fit.

    Lightning's ``ModelCheckpoint(save_on_exception=True)`` would also save, but under the monitored file's name:
    it would overwrite ``best.ckpt``.
    """

    def __init__(self) -> None:
        self.requested = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        replace_sigterm_handler(trainer, self._on_sigterm)
        _watchdog.start()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True  # acted on at the end of the step, by every process together
        _watchdog.handled += 1

    def _agree(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Whether any process got SIGTERM; every process calls this at the same point of every step."""
        if trainer.world_size == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        return bool(trainer.strategy.reduce(flag, reduce_op="sum").item())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._agree(trainer, pl_module):
            stop_as_on_sigterm(trainer)  # Lightning raises SIGTERMException once the step's bookkeeping is done

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._agree(trainer, pl_module):
            raise SIGTERMException

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        callback = trainer.checkpoint_callback
        if not isinstance(exception, SIGTERMException) or callback is None or callback.dirpath is None:
            return
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            path = callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)
            trainer.save_checkpoint(path)
            rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}")


class _Watchdog:
    """Ends the process if SIGTERM arrived and the main thread has not run its Python handler ``STUCK_S`` later."""

    def __init__(self) -> None:
        self.handled = 0  # SIGTERMs the Python handler has run for
        self._sockets: tuple[socket.socket, socket.socket] | None = None

    def start(self) -> None:
        if self._sockets is not None or threading.current_thread() is not threading.main_thread():
            return
        self._sockets = receive, send = socket.socketpair()
        send.setblocking(False)
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)  # the C handler writes each signal's number
        threading.Thread(target=self._watch, args=(receive,), daemon=True, name="sigterm-watchdog").start()

    def _watch(self, receive: socket.socket) -> None:
        arrived = 0
        while received := receive.recv(64):  # empty once the interpreter closes the sockets at exit
            if signal.SIGTERM not in received:
                continue
            arrived += 1
            deadline = time.monotonic() + STUCK_S
            while self.handled < arrived and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.handled < arrived:
                print(
                    f"error: SIGTERM: stopped at once, without saving, after {STUCK_S:g} s stuck in "
                    f"{where(main_thread_stack())}; the last complete checkpoint is kept, resume with --ckpt_path last",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_SIGTERM)


_watchdog = _Watchdog()  # one per process: a process has one wakeup fd
