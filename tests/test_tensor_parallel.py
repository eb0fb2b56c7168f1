"""Tensor parallelism x FSDP2 (``--trainer.strategy=fsdp_tp``): the split attention computes what torchvision's and
timm's compute, weights come in and go out in the plain layout, 2 and 4 CPU processes match one process step by step,
the split layers' bytes halve, a checkpoint saved at tensor-parallel size 2 resumes on one process, the planner's rows.

Why each run is as small as it is (CI runs on 2 CPU cores, and all of this may add about 3 minutes to it):
- Parity: a 2-block timm ViT (4 heads of 48, MLP 768) on 32-pixel digits (4 patches): 20 steps of a 32-image global
  batch compute in about a second; what the runs cost is starting processes and writing checkpoints. SGD with
  momentum and every step clipped, as in test_fsdp.py (Adam would hide a wrong clipping norm, and the norm here is
  taken over two device meshes); a constant learning rate, so that the 2-epoch reference and the 1-epoch runs follow
  the same schedule and the resumed epoch can be compared with the reference's second.
- The command of the issue: torchvision's vit_b_16 (86 M parameters: the realistic size, for the bytes) on
  32-pixel digits, 2 steps of 8 images, one validation and one test batch: enough to train, validate, test, write
  sharded checkpoints and predict from them; its 12 blocks cost startup time, not steps.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from helpers import REPO, exit_message, logged, report, run, shell_env
from helpers import train as train_here

from imgcls.backbones.factory import create_backbone
from imgcls.backbones.partial import load_partial
from imgcls.checkpoints import consolidate, join_state, split_state
from imgcls.data.images import open_image
from imgcls.inference.export import export
from imgcls.inference.predictor import Predictor
from imgcls.parallel.registry import register_strategies
from imgcls.parallel.tensor_parallel import TensorParallelStrategy, make_splittable
from imgcls.planner.cli import auto_fit, configured_strategy

REPORT = "tests/scripts/train_and_report.py"
TINY_VIT = ["--model.backbone=timm/vit_tiny_patch16_224", "--model.backbone_kwargs={depth: 2, num_heads: 4}"]
PARITY = [
    *TINY_VIT,
    "--model.optimizer=torch.optim.SGD",
    "--model.optimizer.lr=0.5",
    "--model.optimizer.momentum=0.9",
    "--model.lr_scheduler=torch.optim.lr_scheduler.ConstantLR",
    "--model.lr_scheduler.factor=1.0",
    "--trainer.gradient_clip_val=0.05",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1",
    "--data.num_workers=0",
    "--trainer.accelerator=cpu",
]
GLOBAL_BATCH = 32
STEPS = 20
ONE_PROCESS_TP = ["--trainer.strategy=imgcls.parallel.tensor_parallel.TensorParallelStrategy",
                  "--trainer.strategy.tensor_parallel_size=1"]  # fmt: skip


def train(workdir: Path, *args: str, devices: int, replicas: int, epochs: int = 1) -> Path:
    """Run the report script (train.py and a per-rank report) in ``workdir``: ``replicas`` read different batches."""
    workdir.mkdir(exist_ok=True)
    result = run(
        REPORT, *PARITY, f"--trainer.devices={devices}", f"--data.batch_size={GLOBAL_BATCH // replicas}",
        f"--trainer.limit_train_batches={STEPS}", f"--trainer.max_epochs={epochs}", *args, cwd=workdir, deadline=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tensor_parallel")
    return {
        "single": train(root / "single", devices=1, replicas=1, epochs=2),  # 40 steps: the resumed run's too
        "tp2": train(root / "tp2", "--trainer.strategy=fsdp_tp", devices=2, replicas=1),
        "dp2_tp2": train(root / "dp2_tp2", "--trainer.strategy=fsdp_tp", devices=4, replicas=2),
    }


def assert_matches_one_process(runs: dict[str, Path], name: str) -> None:
    single, split = logged(runs["single"], "train/loss_step"), logged(runs[name], "train/loss_step")
    assert list(split) == list(range(STEPS))
    assert max(abs(single[step] - split[step]) for step in split) < 1e-4
    norms = logged(runs[name], "grad_norm/total")  # before clipping, over the gradients of both meshes
    assert min(norms.values()) > 10 * 0.05  # every step was clipped
    assert norms == pytest.approx({step: logged(runs["single"], "grad_norm/total")[step] for step in norms}, rel=1e-4)
    ranks = [json.loads(path.read_text()) for path in sorted(runs[name].glob("report_rank*.json"))]
    assert all(r["weights"] == ranks[0]["weights"] for r in ranks)  # gathered split layers and replicated ones agree
    assert len(ranks[0]["weights"]) == len(report(runs["single"])["weights"])  # q, k and v joined: the plain layout


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_on_two_processes_matches_one_process_step_by_step(runs: dict[str, Path]) -> None:
    assert_matches_one_process(runs, "tp2")


@pytest.mark.slow
@pytest.mark.distributed
def test_data_parallel_2_x_tensor_parallel_2_on_four_processes_matches_too(runs: dict[str, Path]) -> None:
    assert_matches_one_process(runs, "dp2_tp2")
    assert report(runs["dp2_tp2"])["weights"] == pytest.approx(report(runs["tp2"])["weights"], rel=1e-4, abs=1e-5)
    assert report(runs["dp2_tp2"])["top1"] == report(runs["tp2"])["top1"]  # the live models agree on held-out images
    # 4 processes hold a quarter of the split layers and half of the rest: less than 2 processes' halves
    assert max(report(runs["dp2_tp2"], rank)["params"] for rank in range(4)) < 0.6 * report(runs["tp2"])["params"]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_checkpoint_saved_at_tensor_parallel_2_resumes_on_one_process(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = shutil.copytree(runs["tp2"], tmp_path / "tp2")
    shards = workdir / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert (shards / "__1_0.distcp").is_file()  # one shard per rank
    # It resumes in the layout it was saved in: any other strategy is refused before loading, in one line
    monkeypatch.chdir(workdir)
    message = exit_message([*PARITY, "--trainer.strategy=fsdp", "--ckpt_path", str(shards)])
    assert message.startswith(f"error: --ckpt_path {shards}: saved with tensor parallelism (fsdp_tp)")
    # The second epoch on one process, from the weights and momentum the two processes saved: the one-process run's
    # second epoch, and its final weights (the first epochs' weights equal too: no later step could, else)
    train(workdir, *ONE_PROCESS_TP, "--ckpt_path", str(shards), devices=1, replicas=1, epochs=2)
    resumed, single = logged(workdir, "train/loss_step", version=1), logged(runs["single"], "train/loss_step")
    assert list(resumed) == list(range(STEPS, 2 * STEPS))
    assert max(abs(single[step] - resumed[step]) for step in resumed) < 1e-4
    assert report(workdir)["weights"] == pytest.approx(report(runs["single"])["weights"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_vit_b_16_trains_tests_and_predicts_from_its_shards_as_the_plain_network(tmp_path: Path) -> None:
    # The command, with the default config and its callbacks, the progress bar included, and one callback
    # more that writes what each rank holds and what the live split model predicts (tests/scripts/train_and_report)
    command = ["--trainer.strategy=fsdp_tp", "--model.backbone", "vit_b_16", "--trainer.accelerator=cpu",
               "--trainer.devices=2", "--data.crop_size", "32", "--trainer.max_epochs=1", "--data.batch_size=8",
               "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
               "--data.num_workers=0", "--trainer.callbacks+=train_and_report.Report"]  # fmt: skip
    paths = [str(REPO / "tests" / "scripts"), *filter(None, [os.environ.get("PYTHONPATH")])]
    result = run("train.py", *command, cwd=tmp_path, deadline=300, env=shell_env(PYTHONPATH=os.pathsep.join(paths)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 0/0" in result.stdout and "test/acc" in result.stdout  # the progress bar, then the test
    shards = tmp_path / "logs" / "version_0" / "checkpoints" / "best.ckpt"
    assert (shards / "__1_0.distcp").is_file()

    # Each rank holds half of every split layer (dp 1 x tp 2) and all of the rest
    vit_b_16 = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    plain = {name: p.numel() * 4 for name, p in vit_b_16.named_parameters()}
    held = [report(tmp_path, rank)["param_bytes"] for rank in (0, 1)]
    split = {name for name in held[0] if ".in_proj." in name or ".out_proj.weight" in name or ".mlp.0." in name}
    split |= {name for name in held[0] if name.endswith(".mlp.3.weight")}
    assert len(split) == 12 * 10  # q, k, v (weight and bias), out_proj.weight, mlp.0 (both), mlp.3.weight
    whole = join_state({name.removeprefix("net."): torch.empty(0) for name in split})
    for rank in held:
        assert sum(rank[name] for name in split) * 2 == sum(plain[name] for name in whole)
        assert all(rank[name] == plain[name.removeprefix("net.")] for name in rank if name not in split)

    # One CPU process answers from the shards, and from them consolidated and exported, all as the plain vit_b_16
    live = report(tmp_path)["top1"]
    images = sorted((tmp_path / "data" / "digits" / "test").glob("*/*.png"))[::27]
    answered = run("predict.py", *map(str, images), "--json", "--checkpoint", str(shards), cwd=tmp_path, deadline=120)
    assert answered.returncode == 0, answered.stderr[-2000:]
    assert [json.loads(line)["predictions"][0]["label"] for line in answered.stdout.splitlines()] == live
    full = consolidate(shards, tmp_path / "full.ckpt")
    assert not any(".in_proj.q." in name for name in torch.load(full, weights_only=True)["state_dict"])
    export(Predictor(shards), tmp_path / "exported", formats=[])  # export.py's state dict and model.json
    for source in (full, tmp_path / "exported"):
        predictor = Predictor(source)
        assert isinstance(predictor.net, torchvision.models.VisionTransformer)
        batch = predictor.preprocess([open_image(path) for path in images])
        assert [predictor.class_names[i] for i in predictor.net(batch).argmax(1).tolist()] == live


@pytest.mark.parametrize("backbone", ["vit_b_16", "timm/vit_tiny_patch16_224"])
def test_the_split_attention_computes_what_the_plain_one_computes(backbone: str) -> None:
    kwargs = {"image_size": 32} if backbone == "vit_b_16" else {"img_size": 32, "num_heads": 4, "depth": 2}
    torch.manual_seed(0)
    plain = create_backbone(backbone, 10, report=lambda line: None, **kwargs).train()  # dropout is 0 in both
    split = make_splittable(create_backbone(backbone, 10, report=lambda line: None, **kwargs))
    split.load_state_dict(split_state(plain.state_dict()))
    assert join_state(split.state_dict()).keys() == plain.state_dict().keys()  # one tensor per attention cut in three
    assert all(torch.equal(tensor, plain.state_dict()[name]) for name, tensor in join_state(split.state_dict()).items())
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    expected = plain(images)
    (grad,) = torch.autograd.grad(expected.square().sum(), images)
    got = split(images)
    assert (got - expected).abs().max() < 1e-6
    assert (torch.autograd.grad(got.square().sum(), images)[0] - grad).abs().max() < 1e-6


def test_networks_tensor_parallelism_cannot_split_are_refused_before_any_process_starts(in_tmp: Path) -> None:
    flags = ["--trainer.strategy=fsdp_tp", "--trainer.accelerator=cpu", "--trainer.devices=2"]
    assert exit_message([*flags, "--model.backbone=resnet18"]) == (
        "error: --trainer.strategy fsdp_tp: tensor parallelism splits torchvision's vit_* and timm's ViTs (vit_*, "
        "deit_*: blocks of self-attention and a two-layer MLP), not resnet18 (its blocks are BasicBlock)"
    )
    assert exit_message([*flags, "--model.backbone=timm/vit_tiny_patch16_224"]) == (
        "error: --trainer.strategy.tensor_parallel_size 2: timm/vit_tiny_patch16_224's blocks have 3 heads and an "
        "MLP 768 wide; give a size that divides both"
    )
    assert exit_message([*flags, *TINY_VIT, "--trainer.strategy=fsdp_tp4"]) == (
        "error: --trainer.strategy.tensor_parallel_size 4: give a divisor of the 2 processes (--trainer.devices x "
        "--trainer.num_nodes)"
    )


@pytest.mark.parametrize(
    ("value", "split", "checkpoint"),
    [("fsdp_tp", 2, False), ("fsdp_tp8_checkpointing", 8, True), ("fsdp", 1, False),
     ({"class_path": "imgcls.parallel.tensor_parallel.TensorParallelStrategy",
       "init_args": {"tensor_parallel_size": 4, "checkpoint_blocks": True}}, 4, True)],
)  # fmt: skip
def test_the_planner_reads_the_configured_split(value: object, split: int, checkpoint: bool) -> None:
    register_strategies()
    spec = configured_strategy(value, 8)
    assert (spec.shard, spec.tensor_parallel, spec.checkpoint) == (True, split, checkpoint)


def test_a_tensor_parallel_checkpoint_loads_partially_into_the_plain_network() -> None:
    kwargs = {"img_size": 32, "num_heads": 4, "depth": 2}
    saved = create_backbone("timm/vit_tiny_patch16_224", 10, report=lambda line: None, **kwargs)
    net = create_backbone("timm/vit_tiny_patch16_224", 10, report=lambda line: None, **kwargs)
    state = {f"net.{name}": tensor for name, tensor in split_state(saved.state_dict()).items()}  # as the strategy saves
    loaded = load_partial(net, state, "a tensor-parallel checkpoint")
    assert loaded.loaded == list(net.state_dict()) and not loaded.unexpected
    assert all(torch.equal(tensor, saved.state_dict()[name]) for name, tensor in net.state_dict().items())


@pytest.mark.slow
def test_published_weights_load_into_the_split_network_shard_by_shard(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torchvision's cached IMAGENET1K_V1 file, planted: random values, equal only if these very tensors were loaded.
    # One process with tensor_parallel_size 1 runs the strategy's path: built on the meta device, q, k and v recorded
    # as parts of the file's in_proj_weight, each process reading only its shards from the memory-mapped file.
    monkeypatch.setenv("TORCH_HOME", str(in_tmp / "torch_home"))
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    path = in_tmp / "torch_home" / "hub" / "checkpoints" / Path(urlparse(weights.url).path).name
    path.parent.mkdir(parents=True)
    planted = torchvision.models.vit_b_16().state_dict()
    torch.save(planted, path)
    flags = ["--model.backbone=vit_b_16", "--model.pretrained=true", "--data.crop_size=224", "--trainer.max_steps=0",
             "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
             "--trainer.limit_test_batches=0", "--data.num_workers=0", "--checkpoint.save_last=false"]  # fmt: skip
    try:
        cli = train_here([*flags, *ONE_PROCESS_TP])
        assert isinstance(cli.trainer.strategy, TensorParallelStrategy)
        state = {name: tensor.full_tensor() for name, tensor in cli.model.net.state_dict().items()}  # all DTensors
    finally:  # one process: its process group is left to the next in-process run unless ended here
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert any(".in_proj.q." in name for name in state)
    loaded = join_state(state)
    assert [name for name in planted if not torch.equal(loaded[name], planted[name])] == [
        "heads.head.weight",
        "heads.head.bias",
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_the_plan_has_tensor_parallel_rows_that_hold_what_the_processes_held(
    runs: dict[str, Path], in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [*TINY_VIT, "--trainer.accelerator=cpu", "--trainer.devices=2", "--plan", "--plan.headroom=0"]
    plan = train_here([*args, f"--data.batch_size={GLOBAL_BATCH}", "--plan.device_memory=80GiB"]).plan
    rows = {e.strategy.flag: e for e in plan.estimates}
    assert list(rows) == ["ddp", "fsdp", "fsdp_checkpointing", "fsdp_tp", "fsdp_tp_checkpointing"]
    assert "fsdp_tp*: the processes that split a block share its batch" in capsys.readouterr().out
    assert rows["fsdp_tp"].params == report(runs["tp2"])["params"]  # rank 0's shards, to the byte
    # A batch whose activations outweigh the weights: split blocks hold half their activations. With memory for the
    # split and checkpointed blocks but not for FSDP's alone, the plan and auto_fit pick tensor parallelism
    big = train_here([*args, "--data.batch_size=2048", "--plan.device_memory=80GiB"]).plan
    rows = {e.strategy.flag: e for e in big.estimates}
    assert rows["fsdp_tp"].activations < 0.9 * rows["fsdp"].activations
    assert rows["fsdp_tp_checkpointing"].peak < rows["fsdp_checkpointing"].peak
    tight = dataclasses.replace(big, device_memory=rows["fsdp_tp_checkpointing"].peak)
    assert tight.recommended.strategy.flag == "fsdp_tp_checkpointing" == auto_fit(tight)
