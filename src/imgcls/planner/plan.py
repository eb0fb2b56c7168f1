"""Will it fit? Each strategy's memory per device for one training run, the cheapest that fits, the largest batch.

``imgcls.planner.step_memory`` counts one step's bytes on fake tensors. Activations grow linearly in the batch size,
so a second step at twice the batch gives the growth per image, and with it the largest batch that fits. A network
that does not run on fake tensors (control flow that reads values, ``if x.max() > 0``) is measured instead with
real batches of 1 and 2 images, extrapolated linearly to the batch size.
"""

import dataclasses
from collections.abc import Callable, Sequence

from torch import nn

from imgcls.backbones.meta import build_on_meta
from imgcls.compat.torch import fake_tensor
from imgcls.errors import UserError
from imgcls.parallel.registry import TENSOR_PARALLEL
from imgcls.parallel.tensor_parallel import check_splittable
from imgcls.planner.step_memory import Job, StepMemory, StrategySpec, step_memory

PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
NOT_TRACEABLE = (
    fake_tensor.DataDependentOutputException,
    fake_tensor.DynamicOutputShapeException,
    fake_tensor.UnsupportedOperatorException,
    fake_tensor.UnsupportedFakeTensorException,
)


def standard_strategies(job: Job, tensor_parallel: Sequence[int] = ()) -> list[StrategySpec]:
    """The strategies a plan compares, cheapest first: the least communication and recomputation.

    ``tensor_parallel``: the sizes tensor parallelism can split the network's blocks into on these devices.
    """
    rows = [StrategySpec("ddp", "ddp", buckets=True) if job.world_size > 1 else StrategySpec("auto", "single device")]
    if job.world_size > job.devices_per_node:  # several nodes: all-gathers within a node, all-reduces across them
        rows.append(StrategySpec("fsdp_hybrid", "fsdp within each node, replicas across", shard=True, hybrid=True))
    rows += [
        StrategySpec("fsdp", "fsdp", shard=True),
        StrategySpec("fsdp_checkpointing", "fsdp + activation checkpointing", shard=True, checkpoint=True),
    ]
    # After FSDP alone, as each block's forward and backward all-reduce its activations twice, more so the more
    # processes split it; before CPU offload, whose transfers cross PCIe
    for size in tensor_parallel:
        for flag, options in TENSOR_PARALLEL.items():  # without, then with activation checkpointing
            if options["tensor_parallel_size"] == size:
                checkpoint = options.get("checkpoint_blocks", False)
                label = f"tensor parallel {size} x fsdp" + (" + activation checkpointing" if checkpoint else "")
                rows.append(StrategySpec(flag, label, shard=True, checkpoint=checkpoint, tensor_parallel=size))
    if job.gpu:  # offload moves state from the GPU to host memory; a CPU has nowhere to move it
        rows.append(StrategySpec("fsdp_cpu_offload", "fsdp + CPU offload", shard=True, offload=True))
        rows.append(
            StrategySpec(
                "fsdp_cpu_offload_checkpointing",
                "fsdp + CPU offload + activation checkpointing",
                shard=True,
                checkpoint=True,
                offload=True,
            )
        )
    return rows


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes one device holds under one strategy.

    ``params``, ``grads`` and ``optimizer``: what the device keeps between steps (its shards under FSDP; nothing
    under CPU offload, where ``host`` has them). ``activations``: saved activations, backward temporaries and the
    batch at the forward-backward peak. ``peak``: the most the step holds at once, which also counts gathered FSDP
    parameters, communication buffers, BatchNorm statistics and the optimizer step's temporaries.
    """

    strategy: StrategySpec
    params: int
    grads: int
    optimizer: int
    activations: int
    peak: int
    host: int
    batch_size: int
    per_image: int  # growth of the forward-backward peak per image of the batch
    forward_backward: int  # the forward-backward peak at ``batch_size``
    update: int  # the optimizer step's peak: it does not grow with the batch
    measured: bool = False  # from real batches: the network does not run on fake tensors

    def peak_at(self, batch_size: int) -> int:
        """The step's peak at another batch size per device, extrapolated linearly from this one and its double."""
        return max(self.forward_backward + (batch_size - self.batch_size) * self.per_image, self.update)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Estimates for the standard strategies, cheapest first, and the configured one, against a device's memory."""

    job: Job
    estimates: list[Estimate]
    configured: Estimate | None  # one of ``estimates`` or an extra one; None if the planner cannot run it
    device_memory: int
    headroom: float
    parameters: int
    target: str = ""  # where ``device_memory`` comes from
    max_batch: int = 0  # the largest batch per device that fits with ``recommended``, else the most frugal strategy

    @property
    def budget(self) -> int:
        """The bytes a step may use: the device memory less the headroom."""
        return int(self.device_memory * (1 - self.headroom))

    def fits(self, estimate: Estimate) -> bool:
        return estimate.peak <= self.budget

    @property
    def recommended(self) -> Estimate | None:
        """The cheapest standard strategy that fits."""
        return next((e for e in self.estimates if self.fits(e)), None)


def make_plan(
    job: Job, device_memory: int, headroom: float = 0.1, configured: StrategySpec | None = None, target: str = ""
) -> Plan:
    """Estimate every standard strategy for ``job``, and ``configured`` too if it holds memory differently."""
    if job.precision not in PRECISIONS:
        raise UserError(f"--trainer.precision {job.precision}: the planner knows {', '.join(PRECISIONS)}")
    if not 0 <= headroom < 1:
        raise UserError(f"--plan.headroom {headroom}: give the share of memory to keep free, e.g. 0.1")
    standard = standard_strategies(job, splittable_sizes(job))
    rows = list(standard)
    if configured is not None and all(configured.memory != row.memory for row in rows):
        rows.append(configured)
    # One run serves a strategy with and without CPU offload: the trackers count both peaks.
    runs: dict[StrategySpec, tuple[StepMemory, int, bool]] = {}
    estimates = []
    for strategy in rows:
        key = dataclasses.replace(strategy, flag="", label="", offload=False)
        if key not in runs:
            runs[key] = _run(job, key)
        estimates.append(_estimate(job, strategy, *runs[key]))
    chosen = next((e for e in estimates if configured is not None and e.strategy.memory == configured.memory), None)
    count = len(standard)
    plan = Plan(job, estimates[:count], chosen, device_memory, headroom, parameter_count(job.build), target)
    frugal = plan.recommended or plan.estimates[-1]
    return dataclasses.replace(plan, max_batch=largest_batch(job, frugal, plan.budget))


def estimate(job: Job, strategy: StrategySpec) -> Estimate:
    """One device's memory for ``job`` under ``strategy``."""
    return _estimate(job, strategy, *_run(job, strategy))


def largest_batch(job: Job, start: Estimate, budget: int, rounds: int = 8) -> int:
    """The largest batch per device whose step fits in ``budget`` bytes under ``start``'s strategy; 0 if none does.

    The forward-backward peak is the largest of several moments' bytes, each linear in the batch size, so it bends
    upwards where another moment takes over, and a line through the batch and its double can miss far from them.
    Secants through steps run at the candidates (on fake tensors: any batch size takes the same time) home in on
    the crossing, until two sizes a step apart bracket the budget.
    """
    if start.update > budget:  # the optimizer step alone does not fit
        return 0
    if start.measured:  # real batches are too costly to search with: the linear extrapolation
        return max(0, start.batch_size + (budget - start.forward_backward) // max(1, start.per_image))
    key = dataclasses.replace(start.strategy, offload=False)
    size = start.batch_size
    known = {size: start.forward_backward, 2 * size: start.forward_backward + size * start.per_image}
    for _ in range(rounds):
        low = max((n for n, peak in known.items() if peak <= budget), default=0)
        high = min((n for n, peak in known.items() if peak > budget), default=None)
        if high is not None and high - low <= 1:
            break
        if low and high:  # a secant through the nearest sizes on each side of the crossing, else the two nearest
            a, b = low, high
        else:
            a, b = sorted(known)[-2:] if high is None else sorted(known)[:2]
        slope = (known[b] - known[a]) / (b - a)
        if slope <= 0:  # nothing grows with the batch
            break
        size = max(low + 1, min(int(a + (budget - known[a]) / slope), high - 1 if high else 2**40))
        try:
            step = step_memory(dataclasses.replace(job, batch_size=size), key, size)
        except ValueError:  # batch norm cannot train on one value per channel: batch 1 is no answer, nor less
            if size > 1:
                raise
            break
        known[size] = step.resident_forward_backward if start.strategy.offload else step.forward_backward
    return max((n for n, peak in known.items() if peak <= budget), default=0)


def splittable_sizes(job: Job) -> list[int]:
    """The tensor-parallel sizes the job's network splits into on its devices: within a node, dividing its heads and
    its MLP's width."""
    sizes = [options["tensor_parallel_size"] for options in TENSOR_PARALLEL.values()]
    sizes = sorted({size for size in sizes if job.devices_per_node % size == 0})
    if not sizes:
        return []
    module = build_on_meta(job.build)
    net = next(child for child in module.children() if any(True for _ in child.parameters()))
    fits = []
    for size in sizes:
        try:
            check_splittable(net, size)
        except UserError:  # not a ViT, or heads that this size does not divide
            continue
        fits.append(size)
    return fits


def parameter_count(build: Callable[[], nn.Module]) -> int:
    """The parameters of the module ``build`` returns, built on the meta device: no memory, no initialisation."""
    return sum(p.numel() for p in build_on_meta(build).parameters())


def _run(job: Job, strategy: StrategySpec) -> tuple[StepMemory, int, bool]:
    """The step's memory at the job's batch size, its growth per image, and whether real tensors measured it."""
    try:
        step = step_memory(job, strategy, job.batch_size)
        double = step_memory(job, strategy, 2 * job.batch_size)
        return step, (double.forward_backward - step.forward_backward) // job.batch_size, False
    except NOT_TRACEABLE:
        one, two = (step_memory(job, strategy, size, fake=False) for size in (1, 2))
        more = job.batch_size - 1

        def extrapolate(field: str) -> int:
            return getattr(one, field) + more * (getattr(two, field) - getattr(one, field))

        fields = ("activations", "forward_backward", "resident_forward_backward")
        step = dataclasses.replace(one, **{field: extrapolate(field) for field in fields})
        return step, two.forward_backward - one.forward_backward, True


def _estimate(job: Job, strategy: StrategySpec, step: StepMemory, per_image: int, measured: bool) -> Estimate:
    offload = strategy.offload
    forward_backward = step.resident_forward_backward if offload else step.forward_backward
    update = step.resident_update if offload else step.update
    return Estimate(
        strategy=strategy,
        params=0 if offload else step.params,
        grads=0 if offload else step.grads,
        optimizer=0 if offload else step.optimizer,
        activations=step.activations,
        peak=max(forward_backward, update),
        host=step.params + step.grads + step.optimizer if offload else 0,
        batch_size=job.batch_size,
        per_image=per_image,
        forward_backward=forward_backward,
        update=update,
        measured=measured,
    )
