"""Multi-process training on the CPU (gloo), started exactly as a user starts it: train.py with the default config
and its callbacks, the progress bar included (it runs on rank 0 alone, which is what once deadlocked these runs)."""

import socket
import sys
from pathlib import Path

import pytest
from helpers import REPO, finish, run, start
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TWO_CPU_PROCESSES = ["--trainer.accelerator=cpu", "--trainer.devices=2"]
# Two epochs of 3 steps, every validation image, 2 test batches, a step logged every 2.
SHORT = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_test_batches=2",
         "--trainer.log_every_n_steps=2"]  # fmt: skip
VAL_IMAGES = 269


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize(
    "flags",
    [
        ["--config", str(REPO / "configs" / "ddp.yaml")],
        # 269 validation images in batches of 67: unpadded, one rank would run 3 batches and the other 2, and a
        # sharded model, whose every forward is a collective, would wait forever for the missing one.
        ["--trainer.strategy=fsdp", "--data.batch_size=67"],
    ],
    ids=["ddp-config", "fsdp-uneven"],
)
def test_two_processes_train_validate_test_and_count_every_val_image_once(tmp_path: Path, flags: list[str]) -> None:
    result = run("train.py", *flags, *TWO_CPU_PROCESSES, *SHORT, cwd=tmp_path, deadline=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout and "Traceback" not in result.stderr
    run_dir = tmp_path / "logs" / "version_0"
    assert {path.name for path in (run_dir / "checkpoints").iterdir()} >= {"best.ckpt", "last.ckpt"}
    logged = scalars(run_dir)
    assert {"train/loss_step", "train/loss", "train/acc", "val/loss", "lr", "perf/epoch_time_s"} <= logged.keys()
    assert len(logged["val/acc"]) == 2  # each epoch validated
    assert len(set(logged["test/acc"])) == 1  # then tested (the HParams tab logs the same value once more)
    # 269 validation images over 2 ranks: a sampler padding with repeats would count 270, so the accuracy is k/269.
    for val_acc in logged["val/acc"]:
        assert abs(val_acc * VAL_IMAGES - round(val_acc * VAL_IMAGES)) < 1e-3
    if flags[0] == "--trainer.strategy=fsdp":  # a folder of shards, which one CPU process answers from
        image = tmp_path / "data" / "digits" / "test" / "3" / "0062.png"
        last = run_dir / "checkpoints" / "last.ckpt"
        predicted = run("predict.py", str(image), "--checkpoint", str(last), cwd=tmp_path, deadline=120)
        assert last.is_dir() and predicted.returncode == 0, predicted.stderr[-2000:]
        assert "%" in predicted.stdout


def test_two_torchrun_nodes_on_loopback_train_to_the_same_weights(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = ["--nnodes=2", "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
    args = [*SHORT, "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.num_nodes=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", *common]
    report = str(REPO / "tests" / "scripts" / "train_and_report.py")  # train.py, and each rank's weights in a file
    nodes = [start([*torchrun, f"--node-rank={rank}", report, *args], tmp_path) for rank in (0, 1)]
    results = finish(nodes, deadline=300)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    assert "test/acc" in results[0].stdout
    reports = [(tmp_path / f"report_rank{rank}.json").read_text() for rank in (0, 1)]
    assert reports[0] == reports[1]
    assert (tmp_path / "logs" / "version_0" / "checkpoints" / "best.ckpt").is_file()
