"""export.py as a user runs it, and the exports as other programs use them: plain torchvision, torch.export, ONNX."""

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, python, run

from imgcls.data.images import open_image
from imgcls.inference.export import TOLERANCE
from imgcls.inference.predictor import Predictor


def digits(trained: Path, per_class: int = 2) -> list[Path]:
    test = trained.parents[1] / "data" / "digits" / "test"
    return [path for cls in sorted(test.iterdir()) for path in sorted(cls.iterdir())[:per_class]]


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The trained checkpoint exported in every format, checked on the held-out digits; (folder, stdout)."""
    folder = tmp_path_factory.mktemp("export") / "bundle"
    ckpt = trained / "checkpoints" / "best.ckpt"
    test_images = trained.parents[1] / "data" / "digits" / "test"
    result = run("export.py", str(folder), "--checkpoint", str(ckpt), "--images", str(test_images), cwd=folder.parent)
    assert result.returncode == 0, result.stderr
    return folder, result.stdout


def test_export_writes_the_bundle_and_checks_each_program(exported: tuple[Path, str], trained: Path) -> None:
    folder, stdout = exported
    assert {p.name for p in folder.iterdir()} == {"model.json", "state_dict.pt", "model.pt2", "model.onnx"}
    manifest = json.loads((folder / "model.json").read_text())
    hparams = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)["hyper_parameters"]
    assert manifest["library"] == "torchvision" and manifest["arch"] == hparams["backbone"] == "resnet18"
    assert manifest["class_names"] == hparams["class_names"] and manifest["num_classes"] == 10
    assert manifest["preprocess"] == hparams["preprocess"]
    assert manifest["files"] == {"state_dict": "state_dict.pt", "pt2": "model.pt2", "onnx": "model.onnx"}
    reported = {
        line.split()[0]: float(line.split("|Δlogits|")[1].split()[0]) for line in stdout.splitlines() if "Δ" in line
    }
    assert set(reported) == {str(folder / "model.pt2"), str(folder / "model.onnx")}
    assert all(difference <= TOLERANCE for difference in reported.values())
    assert "on 270 images (17 batches of at most 16, then the first alone)" in stdout  # every held-out digit, once


def test_plain_torchvision_loads_the_state_dict_without_this_project(exported: tuple[Path, str], trained: Path) -> None:
    folder, _ = exported
    images = digits(trained)
    script = REPO / "benchmarks" / "plain_torchvision.py"
    result = python("-X", "importtime", str(script), str(folder), *map(str, images), cwd=folder.parent)
    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "torchvision" in imported and not [name for name in imported if name.startswith("imgcls")]
    answers = [json.loads(line)["probabilities"] for line in result.stdout.splitlines()]

    predictor = Predictor(trained / "checkpoints" / "best.ckpt")
    expected = predictor.probabilities([open_image(path) for path in images])
    assert len(answers) == len(images)
    for answer, row in zip(answers, expected, strict=True):
        got = torch.tensor([answer[name] for name in predictor.class_names])
        assert got.argmax() == row.argmax()
        assert (got - row).abs().max() <= 1e-5


def test_exported_programs_match_pytorch_on_real_images(exported: tuple[Path, str], trained: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    folder, _ = exported
    predictor = Predictor(trained / "checkpoints" / "best.ckpt")
    batch = predictor.preprocess([open_image(path) for path in digits(trained)])  # (20, 3, 32, 32)
    program = torch.export.load(folder / "model.pt2").module()
    session = onnxruntime.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    for images in (batch, batch[:1], batch[:7]):  # the batch size is dynamic
        with torch.inference_mode():
            expected = predictor.net(images)
            from_program = program(images)
        from_onnx = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        assert from_program.shape == from_onnx.shape == (len(images), 10)
        assert (from_program - expected).abs().max() <= TOLERANCE
        assert (from_onnx - expected).abs().max() <= TOLERANCE


def test_predictor_reads_the_exported_folder(exported: tuple[Path, str], trained: Path) -> None:
    folder, _ = exported
    images = [open_image(path) for path in digits(trained, per_class=1)]
    from_bundle = Predictor(folder)
    assert from_bundle.class_names == list("0123456789")
    assert torch.equal(
        from_bundle.probabilities(images), Predictor(trained / "checkpoints" / "best.ckpt").probabilities(images)
    )


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    result = run("export.py", "out", "--checkpoint", "missing.ckpt", cwd=tmp_path)
    assert result.returncode != 0 and "error: missing.ckpt: no such checkpoint file" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
