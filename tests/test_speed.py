"""Speed options: channels_last, torch.compile and its fallback, float32 matmul precision, JPEG decoding, GC, malloc."""

import gc
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import QUICK, run, train
from PIL import Image

from imgcls.data.datamodule import ImageFolderDataModule
from imgcls.data.images import open_image, read_image
from imgcls.data.transforms import build_transforms, normalize_batch
from imgcls.inference.predictor import Predictor

SHORT = [*QUICK, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
FALLBACK = "--model.compile: torch.compile failed, training goes on without it"


def test_channels_last_trains_and_its_checkpoint_predicts_the_same(in_tmp: Path) -> None:
    cli = train([*QUICK, "--model.channels_last=true"])
    net = cli.model.net
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    best = cli.trainer.checkpoint_callback.best_model_path
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = net.eval()(images)
        predicted = Predictor(best).net(images)  # contiguous weights, built from the checkpoint
    torch.testing.assert_close(predicted, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # inductor compiles resnet18's training and evaluation graphs: about a minute on 2 cores
def test_compile_trains_the_same_network(in_tmp: Path, recwarn: pytest.WarningsRecorder) -> None:
    cli = train([*SHORT, "--model.compile=true"])
    assert not [w for w in recwarn if FALLBACK in str(w.message)]
    model = cli.model.eval()
    assert model.compiled is not None  # it compiled, and is still in use
    images = torch.randn(8, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(images), model.net(images), rtol=1e-4, atol=1e-4)
    assert (
        "compile"
        not in torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)["hyper_parameters"]
    )  # loading the checkpoint elsewhere does not compile


@pytest.mark.parametrize(
    "strategy",
    [
        [],
        # Each block compiled, each failing; the progress bar on, as in every multi-process test
        pytest.param(
            ["--trainer.strategy=fsdp", "--trainer.devices=2", "--trainer.enable_progress_bar=true"],
            marks=[pytest.mark.slow, pytest.mark.distributed],
            id="fsdp",
        ),
    ],
)
def test_compile_failure_falls_back_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: list[str]
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-compiler"))  # inductor needs a C++ compiler on the CPU
    result = run("train.py", *SHORT, "--model.compile=true", "--trainer.accelerator=cpu", *strategy, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if f"UserWarning: {FALLBACK}: " in line]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0], result.stderr[-3000:]
    assert "test/acc" in result.stdout


def test_float32_matmul_precision_is_set_and_recorded(in_tmp: Path) -> None:
    try:
        cli = train([*SHORT, "--float32_matmul_precision=high"])
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    config = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert config["float32_matmul_precision"] == "high"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in(tmp_path: Path) -> None:
    faults = {}
    for keep in ("false", "true"):
        # 14 counted steps: a step now and then faults pages in for other reasons (logging, the heap's own growth),
        # which a median over a few steps does not outvote
        args = [*QUICK, "--trainer.limit_train_batches=16", f"--keep_freed_memory={keep}"]
        result = run("tests/scripts/page_faults.py", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        faults[keep] = statistics.median(json.loads((tmp_path / "page_faults.json").read_text())["per_step"])
    # glibc's defaults fault every step's activations in again: thousands of pages a step for resnet18 at batch 64
    assert faults["false"] > 1000 and faults["true"] < faults["false"] / 10, faults


def test_training_reads_jpegs_to_the_pixels_prediction_sees(tmp_path: Path) -> None:
    """Training decodes JPEGs with torchvision.io, predict.py with Pillow: the model must see the same tensors."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    upright = Image.Exif()
    upright[0x0112] = 6  # EXIF orientation: turn 90 degrees to display upright
    files = {"a/rgb.jpg": photo, "a/gray.jpeg": photo.convert("L"), "b/cmyk.JPG": photo.convert("CMYK")}
    for split in ("train", "val"):
        for name, image in files.items():
            (tmp_path / split / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp_path / split / name, quality=90)
        photo.save(tmp_path / split / "b" / "rotated.jpg", exif=upright)
    data = ImageFolderDataModule(str(tmp_path), crop_size=64)
    data.setup("fit")
    val = data.datasets["val"]
    evaluate = build_transforms(train=False, **data.preprocess)  # what Predictor applies after open_image
    for (path, label), (pixels, target) in zip(val.samples, val, strict=True):
        assert isinstance(read_image(path), torch.Tensor), path  # decoded by torchvision.io, not Pillow
        image = normalize_batch(pixels[None], data.preprocess["mean"], data.preprocess["std"])[0]  # as in training
        assert torch.equal(image, evaluate(open_image(path))), path
        assert target == label


def test_training_leaves_the_garbage_collector_as_it_found_it(in_tmp: Path) -> None:
    train(SHORT)  # freezes the heap while it trains, so full collections skip what lives for the whole run
    assert gc.get_freeze_count() == 0 and gc.isenabled()
