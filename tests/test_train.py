"""train.py as a user runs it: training, checkpoints, logs, every documented flag, and clean errors."""

from pathlib import Path

import pytest
import torch
import yaml
from helpers import QUICK, REPO, run, train


def test_training_writes_checkpoints_config_and_logs(trained: Path) -> None:
    assert {p.name for p in (trained / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    # The digits improve in their second epoch, so the last state is the best: one file under both names, not two.
    best, last = (trained / "checkpoints" / f"{name}.ckpt" for name in ("best", "last"))
    assert best.samefile(last) and torch.load(last, weights_only=True, mmap=True)["epoch"] == 1
    assert list(trained.glob("events.out.tfevents.*"))
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["model"]["backbone"] == "resnet18"


def test_embedded_digits_are_8bit_grayscale_imagefolder(trained: Path) -> None:
    from PIL import Image

    root = trained.parents[1] / "data" / "digits"
    counts = {split: len(list((root / split).glob("*/*.png"))) for split in ("train", "val", "test")}
    assert sum(counts.values()) == 1797 and sorted(p.name for p in (root / "train").iterdir()) == list("0123456789")
    image = Image.open(next((root / "test" / "0").iterdir()))
    assert image.mode == "L" and image.size == (8, 8)
    assert max(image.getdata()) == 255  # ink at full value 16 maps to 255


def test_checkpoint_loads_on_cpu_without_the_cli(trained: Path) -> None:
    from imgcls.model import ImageClassifier

    path = trained / "checkpoints" / "best.ckpt"
    model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert model.hparams.num_classes == 10 and model.hparams.class_names == list("0123456789")
    assert model.hparams.preprocess["crop_size"] == 32
    model.eval()
    with torch.inference_mode():
        logits = model(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_resume_continues_from_the_checkpoint(in_tmp: Path) -> None:
    first = train([*QUICK])
    last = Path(first.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    resumed = train([*QUICK, "--trainer.max_epochs=2", "--ckpt_path", str(last)])
    assert resumed.trainer.current_epoch == 2
    assert resumed.trainer.global_step == 8  # 4 steps restored + 4 new, not 8 new
    saved = torch.load(Path(resumed.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 8


# bf16 on a CPU without bf16 units (AVX2 only, as on CI's) is ~10x slower than fp32: a few images are enough here
SMALL_BATCHES = ["--data.batch_size=8"]


def test_16_mixed_precision_trains(in_tmp: Path) -> None:
    cli = train([*QUICK, "--trainer.precision=16-mixed", *SMALL_BATCHES])
    # CPUs have no fp16 autocast: Lightning runs bf16-mixed there, and warns; GPUs keep 16-mixed.
    assert cli.trainer.precision == ("16-mixed" if torch.cuda.is_available() else "bf16-mixed")
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])


def test_bf16_true_precision_trains(in_tmp: Path) -> None:
    """Images arrive as uint8, which Lightning's cast to the weights' dtype skips: the data module casts them after."""
    cli = train([*QUICK, "--trainer.precision=bf16-true", *SMALL_BATCHES])
    assert cli.model.net.conv1.weight.dtype == torch.bfloat16
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])


def test_help_lists_the_flags_that_matter(tmp_path: Path) -> None:
    result = run("train.py", "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    # Lightning's long lists (Trainer, ModelCheckpoint) are cut to their main flags; --help_all has every one.
    assert len(result.stdout.splitlines()) < 450 and "--trainer.fast_dev_run" not in result.stdout
    assert "--help_all lists" in result.stdout
    every = run("train.py", "--help_all", cwd=tmp_path)
    assert every.returncode == 0
    assert "--trainer.fast_dev_run" in every.stdout and "--checkpoint.save_top_k" in every.stdout
    for flag in (
        "--config",
        "--print_config",
        "--ckpt_path",
        "--trainer.strategy",
        "--trainer.precision",
        "--trainer.devices",
        "--model.backbone",
        "--data.root",
        "--checkpoint.monitor",
    ):
        assert flag in result.stdout


def test_print_config_round_trips_through_config(tmp_path: Path) -> None:
    first = run("train.py", "--data.batch_size=32", "--model.label_smoothing=0.1", "--print_config", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (tmp_path / "run.yaml").write_text(first.stdout)
    second = run("train.py", "--config", "run.yaml", "--print_config", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert yaml.safe_load(second.stdout) == yaml.safe_load(first.stdout)
    assert yaml.safe_load(first.stdout)["data"]["batch_size"] == 32


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_config_files_in_configs_parse(config: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        train(["--config", str(REPO / "configs" / config), "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err
    assert "trainer:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--data.root=/no/such/folder", "error: --data.root /no/such/folder: no such folder"),
        ("--model.backbone=resnet19", "did you mean resnet18"),
        ("--data.std=[0.2,0,0.2]", "error: --data.std [0.2,0,0.2]: expected a list of 3 values, each a number above 0"),
    ],
)
def test_user_mistakes_get_one_line_errors(tmp_path: Path, flag: str, message: str) -> None:
    result = run("train.py", flag, *QUICK, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_default_run_says_only_what_a_user_needs(tmp_path: Path) -> None:
    # Four steps an epoch, fewer than log_every_n_steps: Lightning would warn that it logs too seldom.
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2"]
    result = run("train.py", *short, "--trainer.limit_test_batches=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = (
        "Seed set to 42",
        "GPU available:",
        "TPU available:",
        "`Trainer.fit` stopped: `max_epochs=1` reached.",
        "Restoring states from the checkpoint path at logs/version_0/checkpoints/best.ckpt",
        "Loaded model weights from the checkpoint at logs/version_0/checkpoints/best.ckpt",
    )
    unexpected = [line for line in result.stderr.splitlines() if line and not line.startswith(expected)]
    assert not unexpected  # no tips, no notes on Lightning's own choices, no warnings
    assert "Tip:" not in result.stdout and "test/acc" in result.stdout
