"""Exact resume: a job SIGKILLed after a mid-epoch step checkpoint, then resumed, ends with the weights of a job that
was never stopped, bit for bit, with random augmentation, MixUp/CutMix and loader processes on.

Every run is train.py with the default config and its callbacks (the progress bar, the figures, the monitors),
with weight and gradient histograms on as well, so each shipped callback is resumed mid-epoch too.
"""

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import REPO, finish, script, shell_env, start

from imgcls.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow

# Two epochs of 4 steps, last.ckpt every 2 steps. Lightning holds step checkpoints back until the first validation
# (the monitored val/acc), so the first mid-epoch one is step 6: the second epoch's second step. The job dies as
# step 7 starts, so the resumed run starts inside an epoch, after a checkpoint its loader had run ahead of.
RUN = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
       "--trainer.limit_test_batches=1", "--data.batch_size=16", "--checkpoint.every_n_train_steps=2",
       "--trainer.deterministic=true", "--data.num_workers=1", "--inspection.histograms=true",
       "--data.augment=strong", "--data.mixup_alpha=0.2", "--data.cutmix_alpha=1.0"]  # fmt: skip
KILL = '--trainer.callbacks+={"class_path": "interrupted.KillAtStep", "init_args": {"step": 7}}'
ENV = shell_env(PYTHONPATH=str(REPO / "tests" / "scripts"), OMP_NUM_THREADS="1")


def job(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """train.py with ``RUN`` and ``args`` in ``cwd``, as a job of its own (``KILL`` takes down its process group)."""
    cwd.mkdir(exist_ok=True)
    (result,) = finish([start(script("train.py", *RUN, *args), cwd, ENV)], deadline=420)
    return result


@pytest.mark.parametrize(
    "processes",
    [[], pytest.param(["--trainer.strategy=fsdp", "--trainer.accelerator=cpu", "--trainer.devices=2"],
                      marks=pytest.mark.distributed)],
    ids=["1-process", "fsdp-2-processes"],
)  # fmt: skip
def test_a_job_killed_mid_epoch_resumes_to_the_same_weights_bit_for_bit(tmp_path: Path, processes: list[str]) -> None:
    straight = job(tmp_path / "straight", *processes)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = job(tmp_path / "killed", *processes, KILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["global_step"]) == (1, 6)  # mid-epoch: two of the second epoch's four steps

    resumed = job(tmp_path / "killed", *processes, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from logs/version_0/checkpoints/last.ckpt" in resumed.stderr
    assert "Traceback" not in resumed.stderr and "dataloader is not resumable" not in resumed.stderr
    assert "test/acc" in resumed.stdout

    went_on, stopped = (
        load_checkpoint(tmp_path / run / last.relative_to(tmp_path / "killed")) for run in ("straight", "killed")
    )
    assert went_on["global_step"] == stopped["global_step"] == 8
    assert went_on["state_dict"].keys() == stopped["state_dict"].keys()
    differ = [
        name for name, weights in went_on["state_dict"].items() if not torch.equal(weights, stopped["state_dict"][name])
    ]
    assert not differ, f"{len(differ)} of {len(went_on['state_dict'])} tensors differ, the first: {differ[:3]}"
