"""The bytes one training step holds on one device, by category, counted without allocating the model.

The network is built on the meta device and materialised as fake tensors (``FakeTensorMode``: shapes and dtypes,
no storage). One steady-state step then runs as Lightning runs it: the previous step's gradients and the optimizer
states exist, then forward (under Lightning's precision plugin), ``zero_grad``, backward, optimizer step.
``torch.distributed._tools.mem_tracker.MemTracker`` counts the bytes; for sharded strategies ``FSDPMemTracker``
follows rank 0 of a ``fully_shard`` job over a fake process group of the job's size (collectives do nothing).
The kernels are the CPU's: a GPU's can save slightly different tensors for the backward.
"""

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from imgcls.backbones.meta import build_on_meta
from imgcls.compat.torch import FakeStore, FSDPMemTracker, MemTracker, fake_tensor
from imgcls.errors import UserError
from imgcls.parallel.fsdp2 import recompute_blocks, shard_blocks
from imgcls.parallel.tensor_parallel import split_blocks

# What CPU offload keeps in host memory (FSDPMemTracker's categories); everything else stays on the device.
OFFLOADED = {"sharded param", "sharded grad", "optstate"}
ACTIVATIONS = {"activation", "temp", "inputs", "other"}  # MemTracker files the batch under "Other"


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run as the planner sees it.

    Args:
        build: Returns the module Lightning trains (an ``ImageClassifier`` with its ``net``); called on the meta device.
        optimizer: Builds the optimizer from the parameters.
        batch_size: Images per device and step.
        image_size: Side of the square images.
        precision: Lightning's precision flag.
        world_size: Devices times nodes.
        devices_per_node: Devices (processes) on one node; hybrid sharding shards over these.
        accumulate_grad_batches: Micro-batches per optimizer step.
        gpu: Plan for GPUs: foreach optimizer steps (CUDA's default) and CPU offload are possible.
        name: The network's name, for the report.
    """

    build: Callable[[], nn.Module]
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    batch_size: int
    image_size: int
    precision: str = "32-true"
    world_size: int = 1
    devices_per_node: int = 1
    accumulate_grad_batches: int = 1
    gpu: bool = False
    name: str = "network"


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """A way to spread training over devices, and the ``--trainer.strategy`` value that selects it."""

    flag: str
    label: str
    shard: bool = False
    checkpoint: bool = False
    offload: bool = False
    buckets: bool = False  # DDP's gradient buckets: one more copy of the gradients, held for the whole run
    reshard: bool = True  # FSDP: free gathered parameters after each block's forward (ZeRO-3)
    hybrid: bool = False  # FSDP: shard within a node, replicate across nodes
    sync_every_micro_batch: bool = False  # FSDP, accumulating: gradients reduced and sharded after each micro-batch
    tensor_parallel: int = 1  # processes that split each block (tensor parallelism); FSDP shards over the rest

    @property
    def memory(self) -> tuple[bool | int, ...]:
        """What decides the memory: strategies with equal ``memory`` hold the same bytes."""
        return (
            self.shard, self.checkpoint, self.offload, self.buckets, self.reshard, self.hybrid,
            self.sync_every_micro_batch, self.tensor_parallel,
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes on one device. ``resident_*``: the same peaks without what CPU offload moves to host memory."""

    params: int
    grads: int
    optimizer: int
    activations: int  # saved activations, backward temporaries and the batch, at the forward-backward peak
    forward_backward: int  # the peak from the start of the forward to the end of the backward
    update: int  # the optimizer step's peak
    resident_forward_backward: int
    resident_update: int


def step_memory(job: Job, strategy: StrategySpec, batch_size: int, fake: bool = True) -> StepMemory:
    """Run one steady-state training step of ``job`` under ``strategy`` and count its bytes.

    With ``fake=False`` the tensors are real (and so is the memory): for networks that do not run on fake tensors.
    """
    precision = _precision_plugin(job.precision)
    module = precision.convert_module(build_on_meta(job.build))  # bf16-true: 16-bit weights, still on meta
    with contextlib.ExitStack() as stack:
        if strategy.shard:
            size = job.devices_per_node if strategy.hybrid else job.world_size
            mesh = stack.enter_context(_fake_mesh(size, strategy.tensor_parallel))
            if strategy.tensor_parallel > 1:  # as TensorParallelStrategy does: each block split, on the meta device
                split_blocks(module, mesh["tensor_parallel"])
                mesh = mesh["data_parallel"]
        if strategy.shard:  # as FSDP2Strategy does: fully_shard on each block, then on the network, on meta tensors
            # (over a tensor-parallel mesh, fully_shard makes a device mesh, whose coordinates fake tensors cannot find)
            shard_blocks(module, mesh, checkpoint_blocks=strategy.checkpoint, reshard_after_forward=strategy.reshard)
        if fake:
            stack.enter_context(fake_tensor.FakeTensorMode(allow_non_fake_inputs=True))  # meta tensors become fake
        if strategy.checkpoint and not strategy.shard:
            recompute_blocks(module)
        module.to_empty(device="cpu")
        optimizer = job.optimizer(module.parameters())
        _steady_state(optimizer, foreach=job.gpu)
        images = torch.empty(batch_size, 3, job.image_size, job.image_size)  # (B, C, H, W)
        targets = torch.zeros(batch_size, dtype=torch.long)
        step = _tracker(module, optimizer, strategy.shard)
        if strategy.shard:
            step.track_inputs((images, targets))
        else:
            step.track_external(images, targets)
        # Accumulating under FSDP without a reduce-scatter per micro-batch: the step's last micro-batch starts with
        # the whole gradients of the one before, which the tracker must see made
        accumulating = strategy.shard and job.accumulate_grad_batches > 1 and not strategy.sync_every_micro_batch
        with step:
            micro_batches = 2 if accumulating else 1
            for micro_batch in range(micro_batches):
                for unit in (m for m in module.modules() if isinstance(m, FSDPModule)):
                    unit.set_requires_gradient_sync(micro_batch == micro_batches - 1, recurse=False)
                with precision.forward_context():  # Lightning converts the batch, then runs training_step in this
                    loss = F.cross_entropy(module(precision.convert_input(images)), targets)
                if micro_batch == 0:
                    optimizer.zero_grad()  # Lightning zeroes the gradients after the first forward, before its backward
                loss.backward()
                del loss
        update = _tracker(module, optimizer, strategy.shard)  # one that knows the new gradients
        with update:
            optimizer.step()
        grads = _nbytes(p.grad for p in module.parameters() if p.grad is not None)
        states = _nbytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        buckets = grads if strategy.buckets else 0
        return StepMemory(
            params=_nbytes(module.parameters()),
            grads=grads,
            optimizer=states,
            activations=step.activations,
            forward_backward=step.peak + buckets,
            update=update.peak + buckets,
            resident_forward_backward=step.resident_peak + buckets,
            resident_update=update.resident_peak + buckets,
        )


def _tracker(module: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> "_PeakMemTracker":
    """A tracker that knows the parameters, gradients and optimizer states that exist now."""
    if sharded:  # FSDPMemTracker follows the sharded network: the module's child with parameters
        network = next(m for m in module.children() if any(True for _ in m.parameters()))
        return _PeakFSDPMemTracker(network, optimizer)
    tracker = _PeakMemTracker()
    tracker.track_external(module, optimizer)
    return tracker


def _steady_state(optimizer: torch.optim.Optimizer, foreach: bool) -> None:
    """Give every trainable parameter a gradient and the optimizer its states, as after the first step."""
    for group in optimizer.param_groups:
        if foreach and group.get("foreach", False) is None:
            group["foreach"] = True  # CUDA's default, with its temporaries; CPUs and fake tensors default to a loop
        for param in group["params"]:
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
    optimizer.step()


class _PeakOnly:
    """Only the step's peak by category, and the peak of what stays on the device under CPU offload.

    MemTracker also records each module's own peak, at a cost proportional to the number of modules for every
    operator (for a ViT, several times the cost of the step itself); the planner needs the whole step's only.
    """

    _curr_mem_snap: dict[torch.device, dict]
    _peak_mem: dict[torch.device, int]
    _peak_mem_snap: dict[torch.device, dict]
    resident_peak = 0

    def _update_peak_stats(self, peak_state: object) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            total = snapshot["Total"]
            if self._peak_mem.get(device, 0) < total:
                self._peak_mem[device] = total
                self._peak_mem_snap[device] = dict(snapshot)
            offloaded = sum(v for k, v in snapshot.items() if _kind(k) in OFFLOADED)
            self.resident_peak = max(self.resident_peak, total - offloaded)

    @property
    def peak(self) -> int:
        return sum(snapshot["Total"] for snapshot in self._peak_mem_snap.values())

    @property
    def activations(self) -> int:
        return sum(v for s in self._peak_mem_snap.values() for k, v in s.items() if _kind(k) in ACTIVATIONS)


class _PeakMemTracker(_PeakOnly, MemTracker):
    pass


class _PeakFSDPMemTracker(_PeakOnly, FSDPMemTracker):
    pass


def _kind(key: object) -> str:
    """A snapshot key's category in lower case (the keys are enums, and "Total")."""
    return str(getattr(key, "value", key)).lower()


@contextlib.contextmanager
def _fake_mesh(size: int, tensor_parallel: int = 1) -> Iterator[DeviceMesh]:
    """A device mesh over a fake process group of ``size`` ranks, seen from rank 0; with tensor parallelism a 2-D
    one, (data parallel, tensor parallel), as ``TensorParallelStrategy`` lays out its processes."""
    if dist.is_initialized():
        raise UserError("--plan: plan before the processes start; a process group exists already")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        if tensor_parallel == 1:
            yield init_device_mesh("cpu", (size,))
        else:
            shape, names = (size // tensor_parallel, tensor_parallel), ("data_parallel", "tensor_parallel")
            yield init_device_mesh("cpu", shape, mesh_dim_names=names)
    finally:
        dist.destroy_process_group()


def _precision_plugin(precision: str) -> Precision:
    """Lightning's precision plugin for ``precision``, as its Trainer picks it (with CPU autocast here)."""
    if precision in ("16-true", "bf16-true"):
        return HalfPrecision(precision)
    if precision.endswith("-mixed"):
        # Fake tensors run on the CPU, whose autocast wants bf16; fp16 takes the same bytes.
        return MixedPrecision("bf16-mixed", "cpu")
    return DoublePrecision() if precision == "64-true" else Precision()


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' local storage (a DTensor's own shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total
