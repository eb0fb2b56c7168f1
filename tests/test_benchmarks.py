"""Each benchmark runs end to end at a tiny size and prints its table; the figures themselves are never asserted."""

import re
from pathlib import Path

import pytest
from helpers import QUICK, run
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


def test_time_to_accuracy(tmp_path: Path) -> None:
    result = run("benchmarks/time_to_accuracy.py", "--repeats=1", "--", *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    median = re.search(r"median\s+([0-9.]+)\s+([0-9.]+)", result.stdout)
    assert median is not None, result.stdout
    assert float(median[1]) > 0 and 0 <= float(median[2]) <= 1
