"""FSDP (FSDP2, ``--trainer.strategy=fsdp``) on CPU processes: parity with DDP and one process, half the state per
process, sharded checkpoints (resumed on one process, consolidated, exported, predicted from), gradient
accumulation without a reduce-scatter per micro-batch, clipping by the unsharded norm, hybrid sharding over a 2-D
mesh, 16-bit gathering with BatchNorm kept in fp32, and networks built on the meta device with a normal build's
weights, pretrained ones loaded shard by shard."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import QUICK, logged, report, run
from helpers import train as train_here

from imgcls.backbones.factory import create_backbone
from imgcls.parallel.collectives import DEFAULT_TIMEOUT_S
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
    "--model.optimizer.momentum=0.9",
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


def train_losses(workdir: Path, version: int = 0) -> dict[int, float]:
    """The logged loss of each optimizer step, by global step."""
    return logged(workdir, "train/loss_step", version)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "single": train(root / "single", devices=1),
        "ddp": train(root / "ddp", "--trainer.strategy=ddp", devices=2),
        "fsdp": train(root / "fsdp", "--trainer.strategy=fsdp", devices=2),
        "accumulated": train(root / "accumulated", "--trainer.strategy=fsdp", devices=2, accumulate=2),
        "compiled": train(root / "compiled", "--trainer.strategy=fsdp", "--model.compile=true", devices=2),
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_on_two_processes_matches_one_process_step_by_step(runs: dict[str, Path]) -> None:
    single, ddp = train_losses(runs["single"]), train_losses(runs["ddp"])
    assert list(single) == list(ddp) == list(range(STEPS))
    assert max(abs(single[step] - ddp[step]) for step in single) < 1e-4
    assert report(runs["ddp"], 0)["weights"] == pytest.approx(report(runs["ddp"], 1)["weights"], abs=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_matches_ddp_and_holds_about_half_the_model_state(runs: dict[str, Path]) -> None:
    ddp, fsdp = train_losses(runs["ddp"]), train_losses(runs["fsdp"])
    assert list(fsdp) == list(range(STEPS))
    assert max(abs(ddp[step] - fsdp[step]) for step in ddp) < 1e-4
    for rank in (0, 1):
        full, shard = report(runs["ddp"], rank), report(runs["fsdp"], rank)
        assert min(full["params"], full["grads"], full["optimizer"], shard["grads"]) > 0
        total = {name: r["params"] + r["grads"] + r["optimizer"] for name, r in (("ddp", full), ("fsdp", shard))}
        assert total["fsdp"] <= 0.55 * total["ddp"], total
    assert report(runs["fsdp"], 0)["weights"] == pytest.approx(report(runs["ddp"], 0)["weights"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_checkpoint_resumes_on_one_and_four_processes_consolidates_exports_and_predicts(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    workdir = shutil.copytree(runs["fsdp"], tmp_path / "fsdp")  # the other tests read the run's own reports
    shards = workdir / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and (shards / "__1_0.distcp").is_file()  # one shard per rank

    live = report(workdir, 0)["top1"]  # the 2-rank model in memory when training ended (= last.ckpt)

    # Saved by 2 ranks, resumed by 1 and by 4: one more epoch on top of the restored steps, the same global batches.
    for devices in (1, 4):
        resumed = run(
            REPORT, *VIT, "--trainer.strategy=fsdp", f"--trainer.devices={devices}", "--trainer.max_epochs=2",
            f"--data.batch_size={GLOBAL_BATCH // devices}", f"--trainer.limit_train_batches={STEPS}",
            "--ckpt_path", str(shards), cwd=workdir,
        )  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    one, four = train_losses(workdir, version=1), train_losses(workdir, version=2)
    assert list(one) == list(four) == list(range(STEPS, 2 * STEPS))  # both continue where it stopped
    assert max(abs(one[step] - four[step]) for step in one) < 1e-4

    consolidated = workdir / "full.ckpt"
    done = run("scripts/consolidate_checkpoint.py", str(shards), str(consolidated), cwd=workdir)
    assert done.returncode == 0, done.stderr
    exported = workdir / "exported"  # the plain torchvision layout, state dict only (no programs)
    done = run("export.py", str(exported), "--checkpoint", str(shards), "--formats", cwd=workdir)
    assert done.returncode == 0, done.stderr
    images = sorted((workdir / "data" / "digits" / "test").glob("*/*.png"))[::27]
    answers = {}
    for source in (shards, consolidated, exported):
        result = run(
            "predict.py", *map(str, images), "--json", "--topk", "10", "--checkpoint", str(source), cwd=workdir
        )
        assert result.returncode == 0, result.stderr
        answers[source] = [json.loads(line)["predictions"] for line in result.stdout.splitlines()]
    assert answers[shards] == answers[consolidated] == answers[exported]
    assert [a[0]["label"] for a in answers[shards]] == live


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
def test_compiling_under_fsdp_compiles_each_block_once_and_trains_the_same(runs: dict[str, Path]) -> None:
    compiled = report(runs["compiled"])
    assert compiled["compiled_blocks"] == 2  # both blocks still compiled at the end: no fallback to eager
    # One graph each for training, validation (inference mode) and the report's no_grad forward: both blocks use it
    assert compiled["compiled_graphs"] == 3
    eager = train_losses(runs["fsdp"])
    assert train_losses(runs["compiled"]) == pytest.approx(eager, abs=1e-4)
    assert compiled["weights"] == pytest.approx(report(runs["fsdp"])["weights"], rel=1e-4, abs=1e-5)


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
    assert report(hybrid)["group_timeouts_s"] == [DEFAULT_TIMEOUT_S] * 2  # --collective_timeout's default


@pytest.mark.slow
@pytest.mark.distributed
def test_16_mixed_skips_a_step_on_every_process_when_one_process_overflows(tmp_path: Path) -> None:
    # fp16 autocast on CPU processes: on a CPU Lightning turns the 16-mixed flag into bf16-mixed, but not its plugin.
    # A ViT has no BatchNorm: every unit is gathered in fp16 (test_strategies.py: BatchNorm's units stay fp32).
    plugin = {
        "class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
        "init_args": {"precision": "16-mixed", "device": "cpu"},
    }
    flags = ["--trainer.strategy=fsdp", f"--trainer.plugins={json.dumps(plugin)}", "--trainer.limit_train_batches=2",
             "--trainer.callbacks+=train_and_report.OverflowOnRank1"]  # fmt: skip
    workdir = train(tmp_path / "fp16", *flags, devices=2)
    # Rank 1's overflow skipped the first step on both ranks and halved both scales; a scaler that looked at each
    # process's own shards would have stepped rank 0 and left its scale alone (FSDP1 needed ShardedGradScaler).
    assert [report(workdir, rank)["loss_scale"] for rank in (0, 1)] == [2.0**15, 2.0**15]
    counts = report(workdir)["collectives"]
    assert {name.split()[1] for name in counts if name.startswith("all_gather")} == {"float16"}
    assert {name.split()[1] for name in counts if name.startswith("reduce_scatter")} == {"float32"}


def test_cpu_offload_on_a_cpu_warns_and_trains_without_it(in_tmp: Path) -> None:
    try:
        with pytest.warns(UserWarning, match="cpu_offload: the model is on the CPU already"):
            flags = ["--trainer.strategy=fsdp_cpu_offload_checkpointing", "--trainer.accelerator=cpu"]
            cli = train_here([*QUICK, *flags, "--data.batch_size=8"])
    finally:  # one process: its process group is left to the next in-process run unless ended here
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    strategy = cli.trainer.strategy
    assert strategy.checkpoint_blocks and strategy.cpu_offload and "test/acc" in cli.trainer.callback_metrics


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
