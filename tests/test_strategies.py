"""The pieces of the sharded strategies that need no processes: activation checkpointing and FSDP's units.
Multi-process parity, memory and checkpoints are in test_fsdp.py."""

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import exit_message, train

from imgcls.parallel.fsdp2 import recompute_blocks
from imgcls.parallel.registry import register_strategies


def test_activation_checkpointing_keeps_the_loss_and_lowers_activation_memory() -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    images = torch.randn(8, 3, 128, 128)
    plain = torchvision.models.resnet18(num_classes=10)
    checkpointed = copy.deepcopy(plain)
    assert recompute_blocks(checkpointed) == 8 and recompute_blocks(checkpointed) == 0

    def step(net: torch.nn.Module) -> tuple[float, int]:
        tracker = MemTracker()
        tracker.track_external(net)
        with tracker:
            loss = torch.nn.functional.cross_entropy(net(images), torch.arange(8))
            loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        return loss.item(), next(v for k, v in peak.items() if str(k).endswith("ACT"))

    (loss, activations), (loss_ac, activations_ac) = step(plain), step(checkpointed)
    assert loss_ac == loss
    assert activations_ac < 0.8 * activations
    for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_fsdp_names_are_fsdp2_with_one_unit_per_block() -> None:
    """``--trainer.strategy=fsdp`` and its variants resolve to FSDP2, which makes each ResNet block a unit."""
    import torch.distributed as dist
    from lightning.pytorch.strategies import StrategyRegistry
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from imgcls.parallel.fsdp2 import FSDP2Strategy, shard_blocks
    from imgcls.parallel.registry import VARIANTS

    register_strategies()
    assert all(isinstance(StrategyRegistry.get(name), FSDP2Strategy) for name in VARIANTS)
    assert StrategyRegistry.get("fsdp_hybrid").shard_group_size == "node"
    holder = torch.nn.Module()
    holder.net = torchvision.models.resnet18(num_classes=10)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_blocks(holder, init_device_mesh("cpu", (1,)), gather_dtype=torch.bfloat16)
    finally:
        dist.destroy_process_group()
    units = [m for m in holder.modules() if isinstance(m, FSDPModule)]
    blocks = [m for m in units if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert len(blocks) == 8 and units[0] is holder.net and len(units) == 9  # BatchNorm stays in its block


def test_bf16_gathering_keeps_units_that_hold_batchnorm_in_fp32() -> None:
    """The weights a unit computes with, under a 16-bit gather dtype: bf16 without BatchNorm, fp32 with it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from imgcls.parallel.fsdp2 import shard_blocks

    seen: dict[str, torch.dtype] = {}
    holder = torch.nn.Module()
    holder.resnet = torchvision.models.resnet18(num_classes=10)
    holder.vit = torchvision.models.VisionTransformer(32, 16, 2, 2, 32, 64, num_classes=10)
    for name, layer in [("resnet block", holder.resnet.layer1[0].conv1), ("vit block", holder.vit.encoder.layers[0])]:
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: next(m.parameters()).dtype}))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_blocks(holder, init_device_mesh("cpu", (1,)), gather_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as Lightning's bf16-mixed runs the forward
            holder.resnet(torch.randn(2, 3, 32, 32))
            holder.vit(torch.randn(2, 3, 32, 32))
    finally:
        dist.destroy_process_group()
    assert seen == {"resnet block": torch.float32, "vit block": torch.bfloat16}


def test_deepspeed_without_deepspeed_names_what_works_here(in_tmp) -> None:
    message = exit_message(["--trainer.strategy=deepspeed_stage_3", "--trainer.fast_dev_run=1"])
    assert message.startswith("error: --trainer.strategy deepspeed_stage_3: DeepSpeed is not installed")
    assert "fsdp (ZeRO-3), fsdp_cpu_offload (ZeRO-Offload)" in message


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_bf16_warns_on_a_cpu_without_bf16_instructions_only(in_tmp) -> None:
    flags = Path("/proc/cpuinfo").read_text().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags  # what the CPU says, not what torch reports
    tiny = ["--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false", "--data.batch_size=2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train([*tiny, "--trainer.precision=bf16-mixed", "--data.num_workers=0"])
    emulated = [w for w in caught if "this CPU has no bf16 instructions" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
