"""The ParameterInspector: its histograms equal TensorBoard's own, two processes log what one does, and it warns
about dead layers, vanishing and exploding gradients."""

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_inspected import Tiny, fit
from torch.utils.tensorboard import SummaryWriter

from imgcls.callbacks.inspection import GradientWarning


def read(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_weight_histogram_equals_tensorboards_own_add_histogram(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    first = Tiny().net[0]  # the weights fit() starts from: the histogram at step 0 is taken before the first step
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradientWarning)  # a healthy model raises no alarm
        fit(tmp_path / "ours")
    with SummaryWriter(tmp_path / "reference") as writer:
        writer.add_histogram("weights/net.0", torch.cat([first.weight.flatten(), first.bias.flatten()]).detach(), 0)
    ours = read(tmp_path / "ours").Histograms("weights/net.0")[0]
    reference = read(tmp_path / "reference").Histograms("weights/net.0")[0]
    assert ours.step == 0 and ours.histogram_value.num == reference.histogram_value.num == 15 * 8 + 15
    assert ours.histogram_value.bucket == reference.histogram_value.bucket
    assert ours.histogram_value.bucket_limit == pytest.approx(reference.histogram_value.bucket_limit, rel=1e-6)
    for field in ("min", "max", "sum", "sum_squares"):
        assert getattr(ours.histogram_value, field) == pytest.approx(getattr(reference.histogram_value, field), 1e-5)


def test_a_layer_cut_off_from_the_loss_triggers_the_no_gradient_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, dead_layer=True)
    ours = [str(w.message) for w in caught if issubclass(w.category, GradientWarning)]
    assert len(ours) == 1, ours  # once, though both steps see it
    assert ours[0].startswith("2 trainable parameters get no gradient at step 0: dead.weight, dead.bias.")
    events = read(tmp_path)
    assert [s.value for s in events.Scalars("grad_norm/dead")] == [0.0, 0.0]
    assert "weights/dead" in events.Tags()["histograms"] and "grads/dead" not in events.Tags()["histograms"]


@pytest.mark.parametrize(
    ("loss_scale", "message"),
    [
        (1e6, r"the gradients explode at step 0: total norm \S+ > --inspection.exploding 1000"),
        (1e-12, r"the gradient of net.0 vanishes at step 0: norm \S+ < --inspection.vanishing 1e-07"),
    ],
)
def test_vanishing_and_exploding_gradients_warn(tmp_path: Path, loss_scale: float, message: str) -> None:
    with pytest.warns(GradientWarning, match=message):
        fit(tmp_path, loss_scale=loss_scale)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_log_the_norms_and_histograms_of_one(tmp_path: Path, strategy: str) -> None:
    """DDP replicates each tensor and FSDP2 shards it unevenly (15 rows over 2); both must count every value once."""
    fit(tmp_path / "one")
    result = run("tests/tiny_inspected.py", str(tmp_path / "two"), strategy, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1  # rank 0 writes, alone
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert (
        one.Tags()["histograms"]
        == two.Tags()["histograms"]
        == ["weights/net.0", "weights/net.2", "grads/net.0", "grads/net.2"]
    )
    norms = [tag for tag in one.Tags()["scalars"] if tag.startswith("grad_norm/")]
    assert sorted(norms) == sorted(tag for tag in two.Tags()["scalars"] if tag.startswith("grad_norm/"))
    for tag in norms:
        assert [s.step for s in one.Scalars(tag)] == [s.step for s in two.Scalars(tag)] == [0, 1]
        assert [s.value for s in two.Scalars(tag)] == pytest.approx([s.value for s in one.Scalars(tag)], rel=1e-5)
    for tag in one.Tags()["histograms"]:
        for single, double in zip(one.Histograms(tag), two.Histograms(tag), strict=True):
            a, b = single.histogram_value, double.histogram_value
            assert single.step == double.step and a.num == b.num
            assert sum(a.bucket) == sum(b.bucket) == a.num
            for field in ("min", "max", "sum_squares"):
                assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5)
            assert b.sum == pytest.approx(a.sum, rel=1e-4, abs=1e-6)
