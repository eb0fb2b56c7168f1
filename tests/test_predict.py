"""predict.py as a user runs it, on checkpoints from a real training run."""

import json
from pathlib import Path

import torch
from conftest import run
from PIL import Image

from imgcls.inference import Predictor
from imgcls.model import ImageClassifier


def held_out_images(trained: Path, per_class: int = 2) -> list[tuple[Path, str]]:
    test = trained.parents[1] / "data" / "digits" / "test"
    return [(path, cls.name) for cls in sorted(test.iterdir()) for path in sorted(cls.iterdir())[:per_class]]


def test_predict_names_the_right_class_of_held_out_images(trained: Path) -> None:
    images = held_out_images(trained)
    result = run("predict.py", *(str(p) for p, _ in images), "--json", "--topk", "3", cwd=trained.parents[1])
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["image"] for a in answers] == [str(p) for p, _ in images]
    assert all(len(a["predictions"]) == 3 for a in answers)
    correct = sum(a["predictions"][0]["label"] == label for a, (_, label) in zip(answers, images))
    assert correct >= 0.9 * len(images)


def test_predict_table_output_and_explicit_checkpoint(trained: Path, tmp_path: Path) -> None:
    image, label = held_out_images(trained, per_class=1)[4]
    ckpt = trained / "checkpoints" / "last.ckpt"
    result = run("predict.py", str(image), "--checkpoint", str(ckpt), "--topk", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == label


def test_any_image_mode_and_size_is_accepted(trained: Path, tmp_path: Path) -> None:
    digit = Image.open(held_out_images(trained, per_class=1)[7][0])
    variants = {
        "rgb.jpg": digit.convert("RGB").resize((100, 60)),
        "rgba.png": digit.convert("RGBA").resize((13, 31)),
        "palette.png": digit.convert("P"),
        "gray.png": digit.resize((300, 300)),
    }
    for name, image in variants.items():
        image.save(tmp_path / name)
    result = run("predict.py", *variants, "--json", cwd=tmp_path)  # no --checkpoint: none under tmp_path/logs
    assert result.returncode != 0 and "train first" in result.stderr
    ckpt = str(trained / "checkpoints" / "best.ckpt")
    result = run("predict.py", *variants, "--json", "--checkpoint", ckpt, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(variants)


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
