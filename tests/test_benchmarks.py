"""Each benchmark runs end to end at a tiny size and prints its table; the figures themselves are never asserted."""

import re
from pathlib import Path

import pytest
from helpers import run
from PIL import Image

pytestmark = pytest.mark.slow  # each starts Python, torch and several runs: 10 to 30 s


def ratios(output: str) -> list[float]:
    found = [float(value) for value in re.findall(r"ratio(?: template/loop)?\s+([0-9.]+)", output)]
    assert found and all(value > 0 for value in found), output
    return found


def test_train_throughput(tmp_path: Path) -> None:
    result = run("benchmarks/train_throughput.py", "--epochs=3", "--batches=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    median = re.search(r"median\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+ratio template/loop", result.stdout)
    assert median is not None, result.stdout
    template, loop, ratio = map(float, median.groups())
    assert template > 0 and loop > 0 and ratio > 0
    assert len(re.findall(r"^\s+[23]\s", result.stdout, re.MULTILINE)) == 2  # epochs 2 and 3; the first is not counted


def test_data_pipeline(tmp_path: Path) -> None:
    args = ["--root", str(tmp_path / "jpegs"), "--images=20", "--per_run=5", "--repeats=1"]
    result = run("benchmarks/data_pipeline.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted((tmp_path / "jpegs").glob("class_*/*.jpg"))
    assert len(written) == 20
    assert all(256 <= side <= 512 for path in written for side in Image.open(path).size)
    assert len(ratios(result.stdout)) == 6  # three pipelines, training and evaluation


def test_predict_latency(trained: Path) -> None:
    image = next((trained.parents[1] / "data" / "digits" / "test").glob("*/*.png"))
    checkpoint = trained / "checkpoints" / "best.ckpt"
    args = ["--checkpoint", str(checkpoint), "--image", str(image), "--repeats=1", "--warmup=0", "--warm_runs=3"]
    result = run("benchmarks/predict_latency.py", *args, cwd=trained)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cold start" in result.stdout and "warm latency" in result.stdout
    assert len(ratios(result.stdout)) == 8  # wall and CPU ratios of three cold commands, two warm ones


def test_end_to_end(tmp_path: Path) -> None:
    # One pair of one epoch, without loader processes: the table and its summary, not the figures.
    result = run("benchmarks/end_to_end.py", "--seeds=0", "--epochs=1", "--", "--data.num_workers=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    pair = re.search(r"^\s+0\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", result.stdout, re.MULTILINE)
    assert pair is not None, result.stdout
    template_s, plain_s, ratio, template_acc, plain_acc = map(float, pair.groups())
    assert template_s > 0 and plain_s > 0 and abs(ratio - template_s / plain_s) < 0.01
    assert 0 < template_acc <= 1 and 0 < plain_acc <= 1
    assert "median ratio template/plain" in result.stdout and "mean test accuracy" in result.stdout
