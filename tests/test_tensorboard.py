"""TensorBoard as a user sees it: a default run's event files read with TensorBoard's own reader, the same run
served by a real ``tensorboard`` server, and the histograms one flag away."""

import io
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from helpers import QUICK, train
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tiny_inspected import Tiny

from imgcls.callbacks.inspection import layer_group
from imgcls.callbacks.summary import ParameterSummary

EVERYTHING = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}  # 0: keep every event, not a sample


def read(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance=EVERYTHING)
    events.Reload()
    return events


def values(events: EventAccumulator, tag: str) -> list[float]:
    return [scalar.value for scalar in events.Scalars(tag)]


def text(events: EventAccumulator, tag: str) -> str:
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def test_default_run_logs_sane_scalars(trained: Path) -> None:
    events = read(trained)
    memory = "perf/cuda_peak_mib" if torch.cuda.is_available() else "perf/rss_peak_mib"
    expected = {
        "train/loss_step",
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "test/loss",
        "test/acc",
        "lr",
    }
    expected |= {"perf/epoch_time_s", "perf/train_images_per_s", memory, "grad_norm/total", "grad_norm/net.layer1"}
    assert expected <= set(events.Tags()["scalars"])
    for tag in events.Tags()["scalars"]:
        if tag.endswith(("/acc", "/acc_top5")):
            assert all(0 <= v <= 1 for v in values(events, tag)), tag
        if "loss" in tag or tag.startswith("grad_norm/"):
            assert all(math.isfinite(v) and v > 0 for v in values(events, tag)), tag
    assert values(events, "val/acc")[-1] > 0.5  # two epochs learn the digits
    for tag in ("perf/epoch_time_s", "perf/train_images_per_s", memory):
        assert len(values(events, tag)) == 2 and all(v > 0 for v in values(events, tag)), tag  # once per epoch
    assert min(values(events, memory)) > 100  # MiB: torch and a ResNet alone take more
    # Gradient norms every log_every_n_steps (10), histograms only on request.
    assert [s.step for s in events.Scalars("grad_norm/total")][:3] == [0, 10, 20]
    assert events.Tags()["histograms"] == []


def test_default_run_draws_a_confusion_matrix_and_samples_of_the_test(trained: Path) -> None:
    events = read(trained)
    # Two epochs, fewer than every_n_epochs: no validation figures; the test's once, where test/acc is.
    assert not {"val/confusion_matrix", "val/samples"} & set(events.Tags()["images"])
    for tag in ["test/confusion_matrix", "test/samples"]:
        images = events.Images(tag)
        assert [image.step for image in images] == [events.Scalars("test/acc")[-1].step], tag
        picture = Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("L")
        assert picture.width > 200 and picture.height > 200
        low, high = picture.getextrema()
        assert high - low > 100, f"{tag} is blank"


def test_sample_predictions_show_every_class_when_the_data_comes_class_by_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.tensorboard import SummaryWriter

    from imgcls.callbacks.figures import PredictionFigures
    from imgcls.model import ImageClassifier

    titles, drawn = {}, []
    draw = SummaryWriter.add_figure

    def recorded(writer: SummaryWriter, tag: str, figure, *args, **kwargs) -> None:
        titles[tag] = [ax.get_title() for ax in figure.axes if ax.get_title()]
        drawn.extend([tag] if tag.endswith("samples") else [])
        draw(writer, tag, figure, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_figure", recorded)  # the real drawing, with its titles noted
    names = ["ant", "bee", "cat", "dog"]
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat_interleave(16)  # sorted by class, as ImageFolder's evaluation order is
    model = ImageClassifier("resnet18", num_classes=4, class_names=names, preprocess={})
    figures = PredictionFigures(num_samples=8, every_n_epochs=1)
    # A bare Trainer around one callback, quiet; train.py's runs keep the progress bar (test_train.py).
    trainer = L.Trainer(
        logger=TensorBoardLogger(tmp_path), callbacks=[figures], enable_progress_bar=False, max_epochs=2,
        limit_train_batches=1, num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    trainer.fit(model, loader, loader)
    trainer.test(model, loader, verbose=False)
    true_classes = [title.split(" / ")[1] for title in titles["test/samples"]]
    assert len(true_classes) == 8 and sorted(set(true_classes)) == names  # not 8 ants from the first batch
    assert drawn == ["val/samples", "val/samples", "test/samples"]  # every_n_epochs=1: after each epoch


def test_default_run_records_config_model_summary_and_hparams_with_final_metrics(trained: Path) -> None:
    events = read(trained)
    assert "backbone: resnet18" in text(events, "config")
    parameters = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    summary = text(events, "model/summary")
    assert f"| trainable | {parameters:,} |" in summary and "| frozen | 0 |" in summary
    assert f"| size (float32) | {parameters * 4 / 1e6:,.1f} MB |" in summary
    plugin = events.PluginTagToContent("hparams")
    hparams = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    config = hparams.session_start_info.hparams
    assert config["model/backbone"].string_value == "resnet18" and config["trainer/max_epochs"].number_value == 2
    experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
    assert {"test/acc", "test/loss", "hp_metric"} <= {metric.name.tag for metric in experiment.metric_infos}
    assert values(events, "hp_metric") == [pytest.approx(max(values(events, "val/acc")))]  # the best checkpoint's


def test_live_tensorboard_server_serves_the_run_scalars(trained: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that is free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [Path(sys.executable).with_name("tensorboard"), "--logdir", trained.parent, "--port", str(port)]
    with open(tmp_path / "tensorboard.log", "w") as log:
        server = subprocess.Popen([*map(str, command), "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        tags: dict = {}
        deadline = time.monotonic() + 60
        while "val/acc" not in tags.get(trained.name, {}) and time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "tensorboard.log").read_text()
            time.sleep(0.5)
            try:
                tags = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
            except OSError:  # not listening yet
                continue
        assert {"val/acc", "test/acc", "perf/train_images_per_s", "grad_norm/total"} <= set(tags[trained.name])
        points = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={trained.name}&tag=val/acc")
        assert len(points) == 2 and all(0 <= value <= 1 for _, _, value in points)  # [wall time, step, value]
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::imgcls.callbacks.inspection.GradientWarning")  # a healthy ResNet raises no alarm
def test_weight_and_gradient_histograms_are_one_flag_away(in_tmp: Path) -> None:
    cli = train([*QUICK, "--inspection.histograms=true", "--inspection.every_n_steps=2"])
    events = read(Path(cli.trainer.log_dir))
    sizes: dict[str, int] = {}
    for name, p in cli.model.named_parameters():
        sizes[layer_group(name, 2)] = sizes.get(layer_group(name, 2), 0) + p.numel()
    assert set(sizes) == {"net.conv1", "net.bn1", "net.layer1", "net.layer2", "net.layer3", "net.layer4", "net.fc"}
    assert sorted(events.Tags()["histograms"]) == sorted(
        f"{kind}/{group}" for kind in ("weights", "grads") for group in sizes
    )
    for kind in ("weights", "grads"):
        for group, size in sizes.items():
            histograms = events.Histograms(f"{kind}/{group}")
            assert [h.step for h in histograms] == [0, 2]  # 4 steps, every 2nd
            assert all(h.histogram_value.num == sum(h.histogram_value.bucket) == size for h in histograms)


def test_histograms_without_tensorboard_are_a_one_line_error(in_tmp: Path) -> None:
    with pytest.raises(
        SystemExit, match="--inspection.histograms=true writes to TensorBoard: keep a TensorBoardLogger"
    ):
        train([*QUICK, "--trainer.logger=false", "--inspection.histograms=true"])


def test_model_summary_counts_frozen_parameters_and_sizes_them_at_the_chosen_precision(tmp_path: Path) -> None:
    model = Tiny(hidden=100_000)
    model.net[0].requires_grad_(False)
    # A bare Trainer around the one callback under test; train.py's defaults, bar included, run elsewhere
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-true", max_steps=1, logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[ParameterSummary()], enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    trainer.fit(model)
    summary = text(read(tmp_path), "model/summary")
    frozen, trainable = 8 * 100_000 + 100_000, 100_000 * 3 + 3
    assert f"| trainable | {trainable:,} |" in summary and f"| frozen | {frozen:,} |" in summary
    assert f"| size (bfloat16) | {(frozen + trainable) * 2 / 1e6:,.1f} MB |" in summary  # 2 bytes, not 4
