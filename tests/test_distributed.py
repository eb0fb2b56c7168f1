"""Multi-process training on the CPU (gloo), started exactly as a user starts it."""

from pathlib import Path

import pytest
from conftest import REPO, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_ddp_on_two_cpu_processes_trains_logs_and_counts_every_val_image_once(tmp_path: Path) -> None:
    result = run(
        "train.py", "--config", str(REPO / "configs" / "ddp.yaml"), "--trainer.accelerator=cpu",
        "--trainer.devices=2", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=2",
        "--trainer.enable_progress_bar=false", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "version_0"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"val/acc", "val/loss", "train/loss_step", "lr"} <= set(events.Tags()["scalars"])
    # 269 validation images over 2 ranks: a padded sampler would count 270, so the accuracy is k/269.
    val_acc = events.Scalars("val/acc")[-1].value
    assert 0 < val_acc < 1
    assert abs(val_acc * 269 - round(val_acc * 269)) < 1e-3
