"""predict.py as a user runs it, on checkpoints from a real training run."""

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from helpers import QUICK, REPO, python, run, train
from PIL import Image

from imgcls.inference.predictor import Predictor
from imgcls.model import ImageClassifier


def held_out_images(trained: Path, per_class: int = 2) -> list[tuple[Path, str]]:
    test = trained.parents[1] / "data" / "digits" / "test"
    return [(path, cls.name) for cls in sorted(test.iterdir()) for path in sorted(cls.iterdir())[:per_class]]


def test_predict_names_the_right_class_of_held_out_images(trained: Path) -> None:
    images = held_out_images(trained)
    result = run("predict.py", *(str(p) for p, _ in images), "--json", "--topk", "3", cwd=trained.parents[1])
    assert result.returncode == 0, result.stderr
    picked = f"logs/{trained.name}/checkpoints/best.ckpt"  # the newest run's best, found under ./logs
    classes = ", ".join(map(str, range(10)))
    assert result.stderr == f"checkpoint: {picked} (classes: {classes}); choose another with --checkpoint\n"
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["image"] for a in answers] == [str(p) for p, _ in images]
    assert all(len(a["predictions"]) == 3 for a in answers)
    correct = sum(a["predictions"][0]["label"] == label for a, (_, label) in zip(answers, images, strict=True))
    assert correct >= 0.9 * len(images)


def test_predict_table_output_and_explicit_checkpoint(trained: Path, tmp_path: Path) -> None:
    image, label = held_out_images(trained, per_class=1)[4]
    ckpt = trained / "checkpoints" / "last.ckpt"
    result = run("predict.py", str(image), "--checkpoint", str(ckpt), "--topk", "2", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == ["image", "top-1", "top-2"]
    assert row.split()[:2] == [str(image), label] and row.split()[2].endswith("%")


def mixed_folder(root: Path, digit: Image.Image) -> list[Path]:
    """PNGs and JPEGs in grayscale, RGBA and palette modes, of many sizes, in nested folders; return the images."""
    rotated = Image.new("RGB", (60, 20), "white")
    rotated.paste(digit.convert("RGB").resize((20, 20)), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show the image turned 90 degrees
    variants = {
        "rgb.jpg": digit.convert("RGB").resize((100, 60)),
        "sub/rgba.png": digit.convert("RGBA").resize((13, 31)),
        "sub/palette.png": digit.convert("P"),
        "sub/deeper/gray.png": digit.resize((300, 300)),
        "sub/deeper/gray.jpeg": digit.resize((40, 40)),
        "tiny.png": digit.resize((1, 1)),
    }
    for name, image in variants.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / name)
    rotated.save(root / "rotated.jpg", exif=exif)
    (root / "notes.txt").write_text("not an image: skipped in folders")
    return sorted([root / name for name in variants] + [root / "rotated.jpg"])


def test_mixed_folder_every_image_answered_as_json_and_csv(trained: Path, tmp_path: Path) -> None:
    digit = Image.open(held_out_images(trained, per_class=1)[7][0])
    images = mixed_folder(tmp_path / "mixed", digit)
    for index in range(3):
        digit.save(tmp_path / f"extra{index}.png")
    expected = [str(p.relative_to(tmp_path)) for p in images] + [f"extra{i}.png" for i in range(3)]
    ckpt = str(trained / "checkpoints" / "best.ckpt")

    # A folder and a quoted glob, in batches of 3; imports timed to show Lightning stays out of predict.py
    args = ["mixed", "extra*.png", "--checkpoint", ckpt]
    predict = [str(REPO / "predict.py"), *args, "--batch-size", "3", "--json", "--save-annotated", "ann"]
    result = python("-X", "importtime", *predict, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["image"] for a in answers] == expected
    for answer in answers:
        probs = [p["probability"] for p in answer["predictions"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0.5 < sum(probs) <= 1 + 1e-6
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "imgcls.inference" in imported
    packages = {name.split(".")[0] for name in imported}
    assert not packages & {"lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "jsonargparse"}
    assert not imported & {"imgcls.cli", "imgcls.model", "imgcls.data.datamodule"}

    # Annotated copies mirror the folders; the EXIF-rotated 60x20 JPEG comes out upright, taller than wide
    annotated = sorted(str(p.relative_to(tmp_path / "ann")) for p in (tmp_path / "ann").rglob("*.*"))
    assert annotated == sorted(expected)
    upright = Image.open(tmp_path / "ann" / "mixed" / "rotated.jpg")
    assert upright.height > upright.width

    # CSV, with an unreadable image among them: reported, the others still answered, exit status 1
    (tmp_path / "broken.png").write_text("not a png")
    result = run("predict.py", *args, "broken.png", "--csv", "--topk", "2", cwd=tmp_path)
    assert result.returncode == 1 and "broken.png: not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["image"] for row in rows] == expected
    assert list(rows[0]) == ["image", "label_1", "probability_1", "label_2", "probability_2"]
    assert [row["label_1"] for row in rows] == [a["predictions"][0]["label"] for a in answers]
    for row, answer in zip(rows, answers, strict=True):
        assert abs(float(row["probability_1"]) - answer["predictions"][0]["probability"]) < 1e-6

    result = run("predict.py", "mixed", "--json", cwd=tmp_path)  # no --checkpoint: none under tmp_path/logs
    assert result.returncode != 0 and "train first" in result.stderr


@pytest.mark.slow
def test_predictions_come_from_eval_mode(in_tmp: Path) -> None:
    """With BatchNorm and Dropout, predict.py's probabilities are the validation step's, call after call."""
    cli = train(
        [*QUICK, "--model.backbone=mobilenet_v3_small", "--data.batch_size=16", "--trainer.limit_val_batches=1"]
    )
    net = cli.model.net
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in net.modules())
    seen = []
    hook = net.register_forward_hook(lambda module, inputs, logits: seen.append(logits.softmax(dim=1)))
    best = cli.trainer.checkpoint_callback.best_model_path
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False)
    hook.remove()
    validation = seen[0]  # (16, 10): the one validation batch
    files = [path for path, _ in cli.datamodule.datasets["val"].samples[: len(validation)]]

    args = ["--checkpoint", best, "--json", "--topk", "10", "--batch-size", str(len(files))]
    result = run("predict.py", *files, *files, *args, cwd=in_tmp)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    first, again = answers[: len(files)], answers[len(files) :]
    assert first == again  # the repeated batch: identical, not just close
    names = cli.model.hparams.class_names
    for answer, expected in zip(first, validation, strict=True):
        got = {p["label"]: p["probability"] for p in answer["predictions"]}
        assert max(abs(got[name] - expected[i].item()) for i, name in enumerate(names)) < 1e-6


def test_predictor_matches_the_lightning_module_in_eval_mode(trained: Path) -> None:
    ckpt = trained / "checkpoints" / "best.ckpt"
    predictor = Predictor(ckpt)
    module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    image = Image.open(held_out_images(trained)[0][0]).convert("RGB")
    first, again = predictor([image], topk=10), predictor([image], topk=10)
    assert first == again
    with torch.inference_mode():
        expected = module(predictor.transform(image)[None]).softmax(1)[0]
    got = dict(first[0])
    for index, name in enumerate(module.hparams.class_names):
        assert abs(got[name] - expected[index].item()) < 1e-6


@pytest.mark.parametrize(
    "backbone",
    [
        "mnasnet0_5",  # refuses to load a state dict without its version metadata
        "regnet_x_400mf",  # its constructor cannot run on the meta device
        "timm/levit_128s",  # timm, with non-persistent buffers that no state dict holds
    ],
)
def test_predictor_rebuilds_backbones_exactly(backbone: str, tmp_path: Path) -> None:
    if backbone.startswith("timm/"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    preprocess = {"crop_size": 224, "resize_size": 224}
    module = ImageClassifier(backbone, num_classes=3, class_names=["a", "b", "c"], preprocess=preprocess)
    module.configure_model()
    for name, buffer in module.net.named_buffers():  # statistics unlike a fresh network's, so that they must load
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "x.ckpt")
    predictor = Predictor(tmp_path / "x.ckpt")
    batch = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(predictor.net(batch), module.net.eval()(batch))


def test_unsafe_and_broken_checkpoints_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    evil = run("predict.py", "x.png", "--checkpoint", "evil.ckpt", cwd=tmp_path)
    assert evil.returncode != 0 and "refused" in evil.stderr and "Traceback" not in evil.stderr
    assert not marker.exists()
    junk = run("predict.py", "x.png", "--checkpoint", "junk.ckpt", cwd=tmp_path)
    assert junk.returncode != 0 and "not a readable PyTorch checkpoint" in junk.stderr


def test_a_gif_is_read_by_name_and_a_folder_or_glob_of_them_says_why_it_is_not(trained: Path, tmp_path: Path) -> None:
    digit, label = held_out_images(trained, per_class=1)[3]
    gif = tmp_path / "gifs" / "digit.gif"
    gif.parent.mkdir()
    Image.open(digit).save(gif)
    checkpoint = ["--checkpoint", str(trained / "checkpoints" / "best.ckpt")]
    named = run("predict.py", str(gif), *checkpoint, cwd=tmp_path)
    assert named.returncode == 0 and named.stdout.splitlines()[1].split()[:2] == [str(gif), label], named.stderr
    for name in ("gifs", "gifs/*.gif"):  # training's ImageFolder does not read GIFs, nor do these scans
        scanned = run("predict.py", name, *checkpoint, cwd=tmp_path)
        assert scanned.returncode == 1 and scanned.stderr.startswith(f"error: {name}: "), scanned.stderr
        assert scanned.stderr.endswith("; 1 other files are not read (.gif): name one to classify it anyway\n")
