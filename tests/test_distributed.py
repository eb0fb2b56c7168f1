"""Multi-process training on the CPU (gloo), started exactly as a user starts it."""

from pathlib import Path

import pytest
from conftest import REPO, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize(
    "flags",
    [
        ["--config", str(REPO / "configs" / "ddp.yaml")],
        # 269 validation images in batches of 67: unpadded, one rank would run 3 batches and the other 2, and a
        # sharded model, whose every forward is a collective, would wait forever for the missing one.
        ["--config", str(REPO / "configs" / "fsdp2.yaml"), "--data.batch_size=67", "--trainer.limit_train_batches=3"],
    ],
    ids=["ddp", "fsdp2-uneven"],
)
def test_two_cpu_processes_train_log_and_count_every_val_image_once(tmp_path: Path, flags: list[str]) -> None:
    result = run(
        "train.py", *flags, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_epochs=1",
        "--trainer.log_every_n_steps=2", "--trainer.enable_progress_bar=false", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "version_0"
    assert (run_dir / "checkpoints" / "best.ckpt").exists()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"val/acc", "val/loss", "train/loss_step", "lr"} <= set(events.Tags()["scalars"])
    # 269 validation images over 2 ranks: a sampler padding with repeats would count 270, so the accuracy is k/269.
    val_acc = events.Scalars("val/acc")[-1].value
    assert 0 < val_acc < 1
    assert abs(val_acc * 269 - round(val_acc * 269)) < 1e-3
