"""How fast training runs and how much memory it takes: scalars logged once per training epoch."""

import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from imgcls.data.training_order import replicas
from imgcls.parallel.reduced import log_reduced


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak memory: CUDA memory held by tensors, else the resident set size (none on Windows)."""
    if device.type == "cuda":
        return {"perf/cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        import resource  # Unix only
    except ImportError:
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return {"perf/rss_peak_mib": peak / (2**20 if sys.platform == "darwin" else 2**10)}


class PerformanceMonitor(Callback):
    """Log each training epoch's wall time, its training throughput and the peak memory.

    - ``perf/epoch_time_s``: wall time of the epoch, validation included (the slowest process).
    - ``perf/train_images_per_s``: training images over the time spent training, validation excluded, summed over
      all processes that read different images.
    - ``perf/cuda_peak_mib`` on a GPU: the most memory tensors held during the epoch (the largest process), from
      ``torch.cuda.max_memory_allocated``.
    - ``perf/rss_peak_mib`` on Linux and macOS CPUs: the peak resident set size of the training process since it
      started (data-loader workers not included; the OS keeps no per-epoch peak).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed inside an epoch gets no epoch start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._images = 0
        self._validating_s = 0.0
        self._start = self._now(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[0])  # batch is (images, targets)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validation_start = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validating_s += self._now(pl_module) - self._validation_start

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch_s = self._now(pl_module) - self._start
        images_per_s = self._images / max(epoch_s - self._validating_s, 1e-9)
        peak = peak_memory_mib(pl_module.device)
        slowest = trainer.strategy.reduce(
            torch.tensor([epoch_s, *peak.values()], device=pl_module.device), reduce_op="max"
        )
        total = trainer.strategy.reduce(torch.tensor(images_per_s, device=pl_module.device), reduce_op="sum")
        total = total * replicas(trainer)[0] / trainer.world_size  # tensor-parallel processes share their images
        values = {"perf/epoch_time_s": slowest[0], "perf/train_images_per_s": total}
        log_reduced(pl_module, values | {name: slowest[1 + i] for i, name in enumerate(peak)})

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # CUDA runs ahead of Python: wait for the queued work
        return time.perf_counter()
