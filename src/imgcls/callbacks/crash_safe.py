"""Checkpoints that a killed job cannot leave half written: each file is written beside its old copy, then renamed."""

import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from imgcls.checkpoints import write_failure
from imgcls.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint in a background thread: to a temporary file beside it, flushed to disk, then renamed.

    Lightning's ``_atomic_save`` writes its temporary file in the system's temporary folder and moves it: when that
    is another filesystem (a local ``/tmp`` and checkpoints on shared storage, as on most clusters) the move copies
    the bytes into the checkpoint itself, so a job killed during the copy leaves it truncated. A rename within one
    folder is atomic: a reader sees the old file or the new one. Remote paths (``s3://``) keep fsspec's transaction.

    Training goes on while a file is written: the save copies the state's tensors to CPU memory (one copy, freed
    once written; for a model on a GPU, the same device-to-host copy ``torch.save`` makes) and one thread writes,
    links and removes files in the order they were asked for. Lightning's ``AsyncCheckpointIO`` clones tensors on
    their device (a second copy of a large model in GPU memory) and removes files before earlier writes end. A
    failed write raises at the next save, load or at the end of the run; the file it would have replaced stays.

    The file is written without the CRC32 ``torch.save`` computes for each record by default: ``torch.load`` never
    checks it (only zip tools do, and they report a mismatch), and computing it is half the time of a save.
    """

    def __init__(self) -> None:
        super().__init__()
        self._writer: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            self.wait()
            return super().save_checkpoint(checkpoint, path, storage_options)
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda tensor: tensor.detach().to("cpu", copy=True))
        _keep_metadata(checkpoint, snapshot)
        self._queue(_write_atomically, snapshot, Path(path))

    def link(self, target: Any, link: Any) -> None:
        """Make ``link`` the file ``target`` once that is written: a hard link, or a copy where links cannot be."""
        self._queue(_link_atomically, Path(target), Path(link))

    def remove_checkpoint(self, path: Any) -> None:
        self._queue(super().remove_checkpoint, path)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def wait(self) -> None:
        """Return once every queued write is done; raise the first that failed."""
        queued, self._queued = self._queued, []
        for future in queued:
            future.result()

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None

    def _queue(self, write: Callable[..., None], *args: Any) -> None:
        done = [future for future in self._queued if future.done()]
        self._queued = [future for future in self._queued if not future.done()]
        for future in done:
            future.result()  # a write that failed stops the run at the next checkpoint, not at its end
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._queued.append(self._writer.submit(write, *args))


def _keep_metadata(original: Any, copy: Any) -> None:
    """Give each state dict in ``copy`` the ``_metadata`` of its original, which ``apply_to_collection`` drops: the
    module versions that ``load_state_dict`` passes to modules (torchvision's MNASNet refuses a state dict without)."""
    if isinstance(original, dict):
        if hasattr(original, "_metadata"):
            copy._metadata = original._metadata
        for key, value in original.items():
            _keep_metadata(value, copy[key])
    elif isinstance(original, list | tuple):
        for value, copied in zip(original, copy, strict=True):
            _keep_metadata(value, copied)


def _write_atomically(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per checkpoint: rank 0's thread
    crc32 = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(False)
        with open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())  # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    except BaseException as error:  # a full disk, an interrupt: the old checkpoint stays, the partial copy goes
        tmp.unlink(missing_ok=True)
        failure = write_failure(path, error)
        if failure is None:
            raise
        raise failure from error
    finally:
        torch.serialization.set_crc32_options(crc32)
    _sync_folder(path.parent)


def _link_atomically(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.link")  # not a write's .tmp: a job killed now has not cut a write short
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    _sync_folder(link.parent)


def _sync_folder(folder: Path) -> None:
    """Flush ``folder`` itself: a rename in it survives a crash of the machine."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def check_writable(folder: Path, flag: str) -> None:
    """Make ``folder``, as the run would, and a file in it: a ``UserError`` naming ``flag`` if that fails, before
    training rather than at the first checkpoint, an epoch later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # unnamed where the filesystem allows: nothing to clean up
            pass
    except OSError as error:
        file = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
        reason = f"{file} is a file" if file is not None else error.strerror or error
        raise UserError(
            f"{flag} {folder}: checkpoints cannot be written there ({reason}); point {flag} at a folder you can "
            "write to"
        ) from error


def check_output_folders(trainer: L.Trainer) -> None:
    """``check_writable`` for each local folder the run writes: its logger's and its checkpoints'."""
    folders, callback = {}, trainer.checkpoint_callback
    if trainer.logger is not None and trainer.logger.save_dir:
        folders["--trainer.logger.save_dir"] = str(trainer.logger.save_dir)
    if callback is not None and callback.dirpath:
        folders["--checkpoint.dirpath"] = str(callback.dirpath)
    elif callback is not None and trainer.logger is None:  # Lightning's default: <default_root_dir>/checkpoints
        folders["--trainer.default_root_dir"] = str(trainer.default_root_dir)
    for flag, folder in folders.items():
        if "://" not in folder:  # s3:// and the like: fsspec's to check
            check_writable(Path(folder), flag)


class CrashSafeCheckpoints(L.Callback):
    """Installs ``AtomicCheckpointIO``, unless the user configured a CheckpointIO plugin of their own."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
