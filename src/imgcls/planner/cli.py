"""``--plan`` and ``--trainer.strategy=auto_fit``: the memory planner run on the training command line's settings.

The settings come from the parsed config, exactly as training reads them: the model and data module are constructed
(neither builds the network nor reads images), the Trainer is not. ``imgcls.planner.plan`` does the estimating.
"""

import inspect
import os
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_only

from imgcls.compat.lightning import unified_precision
from imgcls.errors import UserError
from imgcls.parallel.tensor_parallel import tensor_parallel_size
from imgcls.planner.options import AUTO_FIT, PlanOptions, parse_size
from imgcls.planner.plan import Plan, make_plan
from imgcls.planner.step_memory import Job, StrategySpec


def plan_run(model: L.LightningModule, data: L.LightningDataModule, trainer: Namespace, options: PlanOptions) -> Plan:
    """The plan for a parsed training config: ``model`` and ``data`` as constructed, ``trainer`` its config."""
    precision = unified_precision(trainer.precision) or "32-true"
    accelerator = str(trainer.accelerator or "auto").lower()
    gpu = accelerator != "cpu" and (torch.cuda.is_available() or options.device_memory is not None)
    if accelerator in ("gpu", "cuda") and not gpu:
        raise UserError("--plan: no GPU here to read its memory from; give it, e.g. --plan.device_memory 80GiB")
    per_node = _devices(trainer.devices, gpu)
    world = per_node * int(trainer.num_nodes or 1)
    if options.device_memory is not None:
        memory, target = parse_size(options.device_memory), "--plan.device_memory"
    elif gpu:
        device = torch.cuda.get_device_properties(0)
        memory, target = device.total_memory, device.name
    else:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory, target = ram // per_node, "this machine's RAM" + (f" over {per_node} processes" if per_node > 1 else "")
    accepted = inspect.signature(type(model)).parameters  # LightningCLI adds keys of its own (_instantiator)
    hparams = {key: value for key, value in model.hparams.items() if key in accepted}

    def build() -> torch.nn.Module:
        module = type(model)(**hparams)  # the starting weights are not a hyperparameter: none are read
        module.configure_model()
        return module

    job = Job(
        build=build,
        optimizer=model.optimizer,
        batch_size=data.largest_batch_size,
        image_size=data.preprocess["crop_size"],
        precision=precision,
        world_size=world,
        devices_per_node=per_node,
        accumulate_grad_batches=int(trainer.accumulate_grad_batches or 1),
        gpu=gpu,
        name=model.hparams.backbone,
    )
    configured = configured_strategy(trainer.strategy, world)
    return make_plan(job, memory, options.headroom, configured, target=target)


def auto_fit(plan: Plan) -> str:
    """The ``--trainer.strategy`` value of the recommended strategy; says which it chose."""
    best = plan.recommended
    if best is None:
        frugal = plan.estimates[-1].strategy.flag
        fix = f"lower --data.batch_size to {plan.max_batch} ({frugal})" if plan.max_batch else "use more devices"
        raise UserError(f"--trainer.strategy {AUTO_FIT}: no strategy fits in {_size(plan.budget)} per device; {fix}")
    if rank_zero_only.rank == 0:  # every process plans; one says so
        print(
            f"{AUTO_FIT}: --trainer.strategy={best.strategy.flag} ({best.strategy.label}), the cheapest that fits: "
            f"peak {_size(best.peak)} of {_size(plan.budget)} per device (python train.py --plan compares them)"
        )
    return best.strategy.flag


def configured_strategy(value: Any, world_size: int) -> StrategySpec | None:
    """What the configured ``--trainer.strategy`` holds in memory; ``None`` for strategies the planner cannot run."""
    if isinstance(value, str):
        flag, name, args = value, value, {}
    elif isinstance(value, Namespace | dict) and value.get("class_path"):  # class_path and init_args, as parsed
        init = value.get("init_args") or {}
        flag, args = value["class_path"], init.as_dict() if isinstance(init, Namespace) else dict(init)
        name = flag.rsplit(".", 1)[-1]
    else:
        return None
    if name in ("auto", AUTO_FIT, "single_device", "SingleDeviceStrategy") and world_size == 1:
        return StrategySpec(flag, "single device")
    if name in ("auto", AUTO_FIT) or name.startswith("ddp") or name == "DDPStrategy":
        return StrategySpec(flag, "ddp", buckets=True)
    if name.startswith("fsdp") or name in ("FSDP2Strategy", "TensorParallelStrategy"):
        split = args.get("tensor_parallel_size", 2) if name == "TensorParallelStrategy" else tensor_parallel_size(flag)
        return StrategySpec(
            flag,
            name,
            shard=True,
            checkpoint=bool(args.get("checkpoint_blocks", "checkpointing" in name)),
            offload=bool(args.get("cpu_offload", "offload" in name)),
            reshard=bool(args.get("reshard_after_forward", True)),
            hybrid=args.get("shard_group_size") is not None or "hybrid" in name,  # estimated as one node's shards
            sync_every_micro_batch=bool(args.get("sync_every_micro_batch", False)),
            tensor_parallel=int(split or 1),
        )
    return None


def format_plan(plan: Plan) -> str:
    """The plan as a table and a recommendation, for the terminal."""
    job, configured = plan.job, plan.configured
    rows = plan.estimates + ([configured] if configured is not None and configured not in plan.estimates else [])
    name, unit = ("GiB", 2**30) if max(e.peak for e in rows) >= 2**30 else ("MiB", 2**20)
    optimizer = type(job.optimizer([torch.nn.Parameter(torch.empty(1, device="meta"))])).__name__
    nodes = job.world_size // job.devices_per_node
    lines = [
        f"Memory per device for one training step ({name})",
        f"  network   {job.name}, {plan.parameters / 1e6:,.1f} M parameters, {optimizer}",
        f"  batch     {job.batch_size} images of {job.image_size}x{job.image_size} per device, {job.precision}"
        + (f", {job.accumulate_grad_batches} micro-batches per step" if job.accumulate_grad_batches > 1 else ""),
        f"  devices   {job.world_size} ({job.devices_per_node} per node x {nodes} node{'s' * (nodes > 1)})",
        f"  budget    {_size(plan.budget)}: {_size(plan.device_memory)} per device ({plan.target}) less "
        f"{plan.headroom:.0%} headroom",
        "",
        f"  {'--trainer.strategy':34}{'params':>8}{'grads':>8}{'optim.':>8}{'activ.':>8}{'peak':>8}  fits",
    ]
    for e in rows:
        sizes = "".join(f"{b / unit:8.2f}" for b in (e.params, e.grads, e.optimizer, e.activations, e.peak))
        flag = e.strategy.flag + (" *" if e is configured else "")
        lines.append(f"  {flag:34}{sizes}  {'yes' if plan.fits(e) else 'no'}")
    lines.append("")
    if configured is not None:
        lines.append("  * configured")
    if any(e.strategy.offload for e in rows):
        host = _size(max(e.host for e in rows))
        lines.append(f"  CPU offload keeps {host} of parameters, gradients and optimizer states per process in RAM")
    whole_grads = any(e.strategy.shard and not e.strategy.sync_every_micro_batch for e in rows)
    if job.accumulate_grad_batches > 1 and whole_grads:
        lines.append(
            f"  accumulating {job.accumulate_grad_batches} micro-batches: fsdp holds whole gradients between them "
            "(sync_every_micro_batch: true keeps them sharded)"
        )
    if any(e.strategy.tensor_parallel > 1 for e in rows):
        lines.append("  fsdp_tp*: the processes that split a block share its batch: --data.batch_size is per split")
    if any(e.measured for e in rows):
        lines.append("  measured with real batches of 1 and 2 images: the network does not run on fake tensors")
    best = plan.recommended
    if best is None:
        lines.append(f"  no strategy fits {job.batch_size} images per device")
    else:
        lines.append(
            f"  recommended: --trainer.strategy={best.strategy.flag}, the cheapest that fits ({AUTO_FIT} picks it)"
        )
    frugal = (best or plan.estimates[-1]).strategy.flag
    lines.append(f"  largest batch per device that fits with {frugal}: {plan.max_batch:,}")
    lines.append("  not counted: the CUDA context, kernel workspaces and fragmentation; the headroom is for them")
    return "\n".join(lines)


def _devices(devices: Any, gpu: bool) -> int:
    """Processes per node, as Lightning counts ``--trainer.devices``."""
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1", "None"):
        return max(1, torch.cuda.device_count()) if gpu else 1
    return int(text)


def _size(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.0f} MiB"
