"""The peak memory of a real training step, read from the CPU allocator: the measured side of the planner's tests.

Add ``AllocatorPeak`` to a run like any callback (``--trainer.callbacks+=allocator_peak.AllocatorPeak``). From
``setup`` (before the network is built) until the end of the measured training batch, the PyTorch profiler
records every allocation and free of c10's CPU allocator (``profile_memory=True``); the running sum of their sizes
is what the process's tensors hold. The peak is its maximum during that batch: the second (the first steady-state
step: gradients and optimizer states exist from its start), or the one ``AllocatorPeak(batch=N)`` names. This
shares no code or method with the estimate (fake tensors, dispatch-level tracking): it sees real kernels'
allocations, their workspaces included. Each rank writes ``allocator_peak_rank<R>.json`` in the working directory:
``{"peak": bytes}``.
"""

import json

import lightning as L
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function

MEASURED = 1  # the batch index of the measured step
WINDOW = "measured_step"


def allocations() -> profile:
    """A profiler that records the CPU allocator's allocations and frees; enter it to start."""
    return profile(activities=[ProfilerActivity.CPU], profile_memory=True)


def peak_bytes(profiler: profile, window: str | None = None) -> int:
    """The most bytes the allocations made while ``profiler`` ran held at once; within ``window`` if named (a
    ``record_function`` range), counting everything allocated since the profiler started."""
    sizes, span = [], (0, 2**63)  # sizes: (time, bytes), positive for an allocation, negative for a free
    nodes = list(profiler.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        elif window is not None and node.name == window:
            span = (node.start_time_ns, node.end_time_ns)
    held = peak = 0
    for time, size in sorted(sizes, key=lambda s: s[0]):
        held += size
        if span[0] <= time <= span[1]:
            peak = max(peak, held)
    return peak


class AllocatorPeak(L.Callback):
    def __init__(self, batch: int = MEASURED) -> None:
        self.batch = batch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before configure_model builds the network: every byte of the run is seen
            self.profiler = allocations()
            self.profiler.__enter__()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if batch_idx == self.batch:
            self.step = record_function(WINDOW)  # marks the step's start and end on the profiler's clock
            self.step.__enter__()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if batch_idx != self.batch:
            return
        self.step.__exit__(None, None, None)
        self.profiler.__exit__(None, None, None)
        with open(f"allocator_peak_rank{trainer.global_rank}.json", "w") as file:
            json.dump({"peak": peak_bytes(self.profiler, WINDOW)}, file)
