"""FSDP (FSDP2, ``--trainer.strategy=fsdp``) beyond plain sharding, on CPU processes: gradient accumulation without
a reduce-scatter per micro-batch, clipping by the unsharded norm, hybrid sharding over a 2-D mesh, 16-bit
gathering with BatchNorm kept in fp32, and networks built on the meta device with a normal build's weights."""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imgcls.backbones.factory import create_backbone
from imgcls.parallel.deferred_init import build_deferred, materialize

REPORT = "tests/scripts/train_and_report.py"
# 4 SGD steps of a 2-block ViT: no BatchNorm, no dropout, so any number of processes computes the same. SGD, not
# Adam: Adam's update hardly changes when every gradient is scaled alike, so it would hide a wrong clipping norm.
# The clipping threshold is far below the gradients' norm, so every step is clipped.
VIT = [
    "--model.backbone=timm/vit_tiny_patch16_224",
    "--model.backbone_kwargs={depth: 2}",
    "--model.optimizer=torch.optim.SGD",
    "--model.optimizer.lr=0.5",
    "--trainer.gradient_clip_val=0.05",
    "--trainer.max_epochs=1",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
]
GLOBAL_BATCH = 32
STEPS = 4


def train(workdir: Path, *args: str, devices: int, accumulate: int = 1) -> Path:
    workdir.mkdir()
    result = run(
        REPORT, *VIT, f"--trainer.devices={devices}", f"--data.batch_size={GLOBAL_BATCH // devices // accumulate}",
        f"--trainer.accumulate_grad_batches={accumulate}", f"--trainer.limit_train_batches={STEPS * accumulate}",
        *args, cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def report(workdir: Path, rank: int = 0) -> dict:
    return json.loads((workdir / f"report_rank{rank}.json").read_text())


def logged(workdir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(workdir / "logs" / "version_0"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "ddp": train(root / "ddp", "--trainer.strategy=ddp", devices=2),
        "fsdp": train(root / "fsdp", "--trainer.strategy=fsdp", devices=2),
        "accumulated": train(root / "accumulated", "--trainer.strategy=fsdp", devices=2, accumulate=2),
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_clipping_uses_the_norm_of_the_whole_gradient(runs: dict[str, Path]) -> None:
    ddp, fsdp = report(runs["ddp"]), report(runs["fsdp"])
    assert fsdp["params"] < 0.55 * ddp["params"]  # sharded: each process holds about half
    norms = logged(runs["fsdp"], "grad_norm/total")
    assert min(norms.values()) > 10 * 0.05, norms  # every step was clipped
    assert norms == pytest.approx(logged(runs["ddp"], "grad_norm/total"), rel=1e-4)
    assert fsdp["weights"] == pytest.approx(ddp["weights"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_accumulation_reduces_once_per_optimizer_step_and_matches_the_full_batch(runs: dict[str, Path]) -> None:
    whole, accumulated = report(runs["fsdp"]), report(runs["accumulated"])
    scatters = {name: count for name, count in whole["collectives"].items() if name.startswith("reduce_scatter")}
    assert sum(scatters.values()) >= STEPS  # one per FSDP unit and step
    assert {k: v for k, v in accumulated["collectives"].items() if k.startswith("reduce_scatter")} == scatters
    assert accumulated["weights"] == pytest.approx(whole["weights"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_hybrid_sharding_shards_within_groups_and_matches_ddp(runs: dict[str, Path], tmp_path: Path) -> None:
    # 4 processes: 2 replicas x 2 shards. The same global batches as the 2-process DDP run.
    strategy = ["--trainer.strategy=imgcls.parallel.fsdp2.FSDP2Strategy", "--trainer.strategy.shard_group_size=2"]
    hybrid = train(tmp_path / "hybrid", *strategy, devices=4)
    ddp = report(runs["ddp"])
    halves = [report(runs["fsdp"], rank)["params"] for rank in range(2)]
    assert [report(hybrid, rank)["params"] for rank in range(4)] == halves * 2  # one of 2 shards each, not of 4
    assert report(hybrid)["weights"] == pytest.approx(ddp["weights"], rel=1e-4, abs=1e-5)
    assert report(hybrid, 3)["weights"] == report(hybrid, 0)["weights"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("backbone", "gathered"),
    [("timm/vit_tiny_patch16_224", {"bfloat16"}), ("resnet18", {"float32"})],
    ids=["layernorm-gathers-bf16", "batchnorm-stays-fp32"],
)
def test_bf16_mixed_gathers_in_16_bits_and_reduces_in_fp32(tmp_path: Path, backbone: str, gathered: set) -> None:
    kwargs = "--model.backbone_kwargs={depth: 2}" if backbone.startswith("timm/") else "--model.backbone_kwargs={}"
    flags = ["--trainer.strategy=fsdp", "--trainer.precision=bf16-mixed", f"--model.backbone={backbone}", kwargs]
    workdir = train(tmp_path / "bf16", *flags, "--trainer.limit_train_batches=2", devices=2)
    counts = report(workdir)["collectives"]
    assert {name.split()[1] for name in counts if name.startswith("all_gather")} == gathered
    assert {name.split()[1] for name in counts if name.startswith("reduce_scatter")} == {"float32"}
    assert report(workdir)["weights"] == pytest.approx(report(workdir, 1)["weights"], abs=0)


@pytest.mark.parametrize(
    "name",
    ["resnet18", "vit_b_16", "convnext_tiny", "efficientnet_b0", "swin_t", "maxvit_t", "densenet121", "inception_v3",
     "timm/vit_tiny_patch16_224"],
)  # fmt: skip
def test_a_network_built_on_the_meta_device_gets_a_normal_builds_weights(name: str) -> None:
    """Every initialiser replayed on real memory, the random ones from the generator state they saw: bit for bit."""
    build = lambda: create_backbone(name, 10, report=lambda line: None)  # noqa: E731
    torch.manual_seed(0)
    normal = build().state_dict()
    after_normal = torch.rand(4)
    torch.manual_seed(0)
    deferred = build_deferred(build)
    assert all(t.is_meta for t in deferred.state_dict().values())
    materialize(deferred, torch.device("cpu"))
    assert torch.equal(torch.rand(4), after_normal)  # the training that follows draws the same numbers too
    assert {k: v.dtype for k, v in deferred.state_dict().items()} == {k: v.dtype for k, v in normal.items()}
    assert [k for k, v in deferred.state_dict().items() if not torch.equal(v, normal[k])] == []


@pytest.mark.slow
@pytest.mark.distributed
def test_a_300m_vit_loads_pretrained_shards_without_any_process_holding_it_whole(tmp_path: Path) -> None:
    weights = tmp_path / "vit_l_16.pth"
    torch.save(torchvision.models.vit_l_16().state_dict(), weights)  # 304 M parameters: 1.2 GB
    flags = [str(weights), "--model.backbone=vit_l_16", "--data.num_workers=0", "--trainer.accelerator=cpu"]
    reports = {}
    for name, extra in {
        "one": ["--trainer.devices=1"],
        "fsdp": ["--trainer.strategy=fsdp", "--trainer.devices=2"],
    }.items():
        (tmp_path / name).mkdir()
        result = run("tests/scripts/setup_memory.py", *flags, *extra, cwd=tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = [json.loads(path.read_text()) for path in sorted((tmp_path / name).glob("setup_rank*.json"))]
    (one,) = reports["one"]
    assert len(reports["fsdp"]) == 2
    for rank in reports["fsdp"]:
        assert rank["compared"] == one["compared"] > 290 and rank["equal"] == rank["compared"]  # all but the head
        assert rank["peak_rss"] <= 0.6 * one["peak_rss"], (rank["peak_rss"], one["peak_rss"])


def test_a_build_that_cannot_be_recorded_is_built_whole_with_a_warning() -> None:
    def build() -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        with torch.no_grad():
            net[1].weight.copy_(net[0].weight)  # one parameter initialised from another
        return net

    torch.manual_seed(0)
    normal = build().state_dict()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="built whole in every process.*copy_ reads another meta tensor"):
        net = build_deferred(build)
    assert all(torch.equal(value, normal[key]) for key, value in net.state_dict().items())
