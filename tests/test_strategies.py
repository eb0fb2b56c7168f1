"""Scale-out on CPUs: DDP and FSDP2 parity, sharded memory, activation checkpointing, sharded checkpoints,
multi-node launch, and the FSDP block wrapping that GPUs get."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imgcls.parallel.fsdp2 import recompute_blocks
from imgcls.parallel.registry import register_strategies

REPORT = "tests/scripts/train_and_report.py"
# 10 optimizer steps (2 epochs of 5) of ConvNeXt-T without stochastic depth: LayerNorm instead of BatchNorm
# (whose batch statistics differ per process) and no randomness, so any number of processes computes the same.
# Its smooth activations keep float rounding from growing (a ReLU net with Adam drifts by 1e-4 in 20 steps).
PARITY = [
    "--model.backbone=convnext_tiny",
    "--model.backbone_kwargs={stochastic_depth_prob: 0.0}",
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=5",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
]
GLOBAL_BATCH = 64


def train_losses(workdir: Path, version: int = 0) -> dict[int, float]:
    """The logged loss of each optimizer step, by global step."""
    events = EventAccumulator(str(workdir / "logs" / f"version_{version}"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars("train/loss_step")}


def report(workdir: Path, rank: int) -> dict:
    return json.loads((workdir / f"report_rank{rank}.json").read_text())


def train(workdir: Path, *args: str, devices: int = 1) -> Path:
    workdir.mkdir(exist_ok=True)
    batch = f"--data.batch_size={GLOBAL_BATCH // devices}"
    result = run(REPORT, *PARITY, f"--trainer.devices={devices}", batch, *args, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 10 steps on one process, on two with DDP and on two with FSDP2."""
    root = tmp_path_factory.mktemp("parity")
    return {
        "single": train(root / "single"),
        "ddp": train(root / "ddp", "--trainer.strategy=ddp", devices=2),
        "fsdp": train(root / "fsdp", "--trainer.strategy=fsdp", devices=2),
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_on_two_processes_matches_one_process_step_by_step(runs: dict[str, Path]) -> None:
    single, ddp = train_losses(runs["single"]), train_losses(runs["ddp"])
    assert list(single) == list(ddp) == list(range(10))
    assert max(abs(single[step] - ddp[step]) for step in single) < 1e-4
    assert report(runs["ddp"], 0)["weights"] == pytest.approx(report(runs["ddp"], 1)["weights"], abs=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_matches_ddp_and_holds_about_half_the_model_state(runs: dict[str, Path]) -> None:
    ddp, fsdp2 = train_losses(runs["ddp"]), train_losses(runs["fsdp"])
    assert list(fsdp2) == list(range(10))
    assert max(abs(ddp[step] - fsdp2[step]) for step in ddp) < 1e-4
    for rank in (0, 1):
        full, shard = report(runs["ddp"], rank), report(runs["fsdp"], rank)
        assert min(full["params"], full["grads"], full["optimizer"], shard["grads"]) > 0
        total = {name: r["params"] + r["grads"] + r["optimizer"] for name, r in (("ddp", full), ("fsdp", shard))}
        assert total["fsdp"] <= 0.55 * total["ddp"], total
    assert report(runs["fsdp"], 0)["weights"] == pytest.approx(report(runs["ddp"], 0)["weights"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_checkpoint_resumes_on_one_process_consolidates_and_predicts(runs: dict[str, Path]) -> None:
    workdir = runs["fsdp"]
    shards = workdir / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and (shards / "__1_0.distcp").is_file()  # one shard per rank

    live = report(workdir, 0)["top1"]  # the 2-rank model in memory when training ended (= last.ckpt)

    # Saved by 2 ranks, resumed by 1: one more epoch on top of the 10 restored steps.
    resumed = run(
        REPORT,
        *PARITY,
        "--trainer.strategy=fsdp",
        "--trainer.devices=1",
        "--trainer.max_epochs=3",
        "--data.batch_size=64",
        "--ckpt_path",
        str(shards),
        cwd=workdir,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(train_losses(workdir, version=1)) == list(range(10, 15))  # continues at step 10

    consolidated = workdir / "full.ckpt"
    done = run("scripts/consolidate_checkpoint.py", str(shards), str(consolidated), cwd=workdir)
    assert done.returncode == 0, done.stderr
    images = sorted((workdir / "data" / "digits" / "test").glob("*/*.png"))[::27]
    answers = {}
    for source in (shards, consolidated):
        result = run(
            "predict.py", *map(str, images), "--json", "--topk", "10", "--checkpoint", str(source), cwd=workdir
        )
        assert result.returncode == 0, result.stderr
        answers[source] = [json.loads(line)["predictions"] for line in result.stdout.splitlines()]
    assert answers[shards] == answers[consolidated]
    assert [a[0]["label"] for a in answers[shards]] == live


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
