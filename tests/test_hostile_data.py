"""Hostile input, issue #18, classes 4 and 5 (part of the hostile-input suite).

Class 4, silent wrong data: class folders walked through symbolic links that loop or reach a file twice, and data too
small to train on. Class 5, memory bombs that Pillow's pixel check lets through: a thin image that evaluation's resize
blows up, and crop or resize sizes (flags, checkpoints, exported models) that would take gigabytes an image. Each must
end as one line naming the path or option and the fix, before anything trains; legitimate links must keep working.
"""

import importlib.util
import os
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import QUICK, REPO, exit_message, run, train
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.datasets import ImageFolder

from imgcls.data.checks import CheckedImageFolder
from imgcls.data.trainable import fitted_batch_size, refuse_idle_epochs
from imgcls.errors import UserError
from imgcls.inference.exported import MANIFEST, write_bundle
from imgcls.inference.predictor import Predictor, load_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LEAN = [*QUICK, "--trainer.callbacks=null", "--trainer.enable_model_summary=false", "--inspection.every_n_steps=0",
        "--data.crop_size=8", "--data.resize_size=8"]  # fmt: skip
ALL_BATCHES = ["--trainer.limit_train_batches=null", "--trainer.limit_val_batches=null"]
LIMIT = "more than Pillow's decompression-bomb limit of 89.5 M (PIL.Image.MAX_IMAGE_PIXELS)"
THIN = f"1 x 2000000 pixels, which resizing to 8 makes 8 x 16000000, 128 M pixels: {LIMIT}"  # a 4 KB PNG


def images(folder: Path, names: str = "ab", per_class: int = 6) -> None:
    """Small, valid, noisy RGB PNGs, ``0.png`` and up, in one folder per class."""
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / name / f"{index}.png")


def link(path: str, target: str) -> None:
    """A symbolic link at ``path`` (relative to the current folder) to ``target``, in place of what was there."""
    where = Path(path)
    if where.is_dir():
        shutil.rmtree(where)
    where.unlink(missing_ok=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, where)


def checkpoints(root: Path) -> list[Path]:
    return list(root.glob("logs/**/*.ckpt"))


# Class 4: links that loop or reach a file twice; too little data to train on.


@pytest.mark.parametrize(
    ("links", "named"),
    [
        ({"pets/a/loop": "."}, "pets/a/loop is a link to . (pets/a)"),  # 12 images read as 492
        ({"pets/b/up": ".."}, "pets/b/up is a link to .. (pets)"),  # every a read as a b too
        ({"pets/a/deep/back": ".."}, "pets/a/deep/back is a link to .. (pets/a)"),
        ({"pets/a/x": "../b", "pets/b/y": "../a"}, "pets/a/x/y is a link to ../a (pets/a)"),  # between two classes
        ({"pets/b/everything": "/"}, "pets/b/everything is a link to / (/)"),  # the whole disk
        ({"pets/c": "."}, "pets/c is a link to . (pets)"),  # a class folder that is the dataset's folder
    ],
)
def test_a_link_back_up_the_folders_is_refused_naming_it(in_tmp: Path, links: dict[str, str], named: str) -> None:
    images(in_tmp / "pets")
    for where, target in links.items():
        link(where, target)
    assert exit_message([*LEAN, "--data.root=pets"]) == (
        f"error: {named}, a folder that holds it: the class folders would be read round and round through it, every "
        "image many times; remove the link or point it elsewhere"
    )
    assert not checkpoints(in_tmp)


TWICE = "are one file, reached through a symbolic link"
FIX = "remove the link or the extra path, so that every image is read once"


@pytest.mark.parametrize(
    ("links", "message"),
    [
        (
            {"pets/b/more": "../a"},  # a class folder linked into another
            f"pets/a/0.png (train, class a) and pets/b/more/0.png (train, class b) {TWICE}: it would be trained on "
            "twice as both a and b, or both trained and validated on (--data.val_fraction holds out images at "
            f"random); {FIX} (5 more files are reached twice)",
        ),
        (
            {"pets/b/6.png": "../a/0.png"},  # one file linked into another class
            f"pets/a/0.png (train, class a) and pets/b/6.png (train, class b) {TWICE}: it would be trained on twice as "
            "both a and b, or both trained and validated on (--data.val_fraction holds out images at random); " + FIX,
        ),
        (
            {"pets/a/x.png": "../../outside.png", "pets/b/x.png": "../../outside.png"},  # two links to one file
            f"pets/a/x.png (train, class a) and pets/b/x.png (train, class b) {TWICE}: it would be trained on twice as "
            "both a and b, or both trained and validated on (--data.val_fraction holds out images at random); " + FIX,
        ),
        (
            {"split/val": "train"},  # a validation split that is the training split
            f"split/train/a/0.png (train, class a) and split/val/a/0.png (val, class a) {TWICE}: it would be both "
            f"trained on and validated on, which overstates accuracy; {FIX} (11 more files are reached twice)",
        ),
        (
            {"split/val/b/0.png": "../../train/b/5.png"},  # one validation image that is a training image
            f"split/train/b/5.png (train, class b) and split/val/b/0.png (val, class b) {TWICE}: it would be both "
            f"trained on and validated on, which overstates accuracy; {FIX}",
        ),
        (
            {"split/test/a": "../val/b"},  # the test images of a are val's b
            f"split/val/b/0.png (val, class b) and split/test/a/0.png (test, class a) {TWICE}: it would be both "
            f"validated on and tested on as both b and a, which overstates accuracy; {FIX} (5 more files are reached "
            "twice)",
        ),
    ],
)
def test_a_file_reached_twice_is_refused_naming_both_paths(in_tmp: Path, links: dict[str, str], message: str) -> None:
    images(in_tmp / "pets")
    Image.new("RGB", (12, 12)).save(in_tmp / "outside.png")
    for split in ("train", "val", "test"):
        images(in_tmp / "split" / split)
    for where, target in links.items():
        link(where, target)
    root = "split" if next(iter(links)).startswith("split") else "pets"
    assert exit_message([*LEAN, f"--data.root={root}"]) == f"error: {message}"
    assert not checkpoints(in_tmp)


def test_links_that_reach_every_file_once_still_train(in_tmp: Path) -> None:
    """Class folders and files linked from another disk, and nested folders, are read as before: the same files in
    ImageFolder's order, so the seeded validation split is the same too."""
    images(in_tmp / "disk" / "cats", names="ab")
    images(in_tmp / "pets", names="c")
    link("pets/a", "../disk/cats/a")  # a class folder on another disk
    link("pets/b/nested/deeper", "../../../disk/cats/b")
    link("pets/c/9.png", "../../disk/other.png")  # a file on another disk
    Image.new("RGB", (12, 12)).save(in_tmp / "disk" / "other.png")
    ours = CheckedImageFolder("pets")
    assert ours.samples == ImageFolder("pets").samples and len(ours.samples) == 19
    cli = train([*LEAN, "--data.root=pets"])
    assert len(cli.datamodule.datasets["train"]) + len(cli.datamodule.datasets["val"]) == 19
    assert cli.trainer.global_step > 0 and checkpoints(in_tmp)


@pytest.mark.parametrize(
    ("root", "flags", "message"),
    [
        (
            "pets",  # 36 images, as issue #18 reported: 0 steps, then the untrained network tested, exit status 0
            ["--data.batch_size=64"],
            "--data.batch_size 64 is larger than the 32 training images of pets (4 of its 36 held out for validation): "
            "every epoch would train 0 steps, as the last, incomplete batch is dropped; use --data.batch_size 32 or "
            "less, or leave it unset to fit it to the data",
        ),
        (
            "five",  # a fraction inside (0, 1) that leaves none of 5 images
            ["--data.val_fraction=0.999"],
            "--data.val_fraction 0.999 holds out all 5 images of five for validation and leaves none to train on; give "
            "a smaller fraction (at most 0.8 here), or split the images into five/train and five/val yourself",
        ),
        (
            "split",  # train/ and val/: nothing held out
            ["--data.batch_size=8"],
            "--data.batch_size 8 is larger than the 6 training images of split/train: every epoch would train 0 steps, "
            "as the last, incomplete batch is dropped; use --data.batch_size 6 or less, or leave it unset to fit it to "
            "the data",
        ),
        (
            "broken",  # 6 of its 12 images unreadable, and skipped
            ["--data.batch_size=6", "--data.on_bad_image=skip"],
            "--data.batch_size 6 is larger than the 5 training images of broken (1 of its 6 held out for validation): "
            "every epoch would train 0 steps, as the last, incomplete batch is dropped; use --data.batch_size 5 or "
            "less, or leave it unset to fit it to the data",
        ),
    ],
)
def test_too_little_data_to_train_is_refused_before_training(
    in_tmp: Path, root: str, flags: list[str], message: str
) -> None:
    images(in_tmp / "pets", per_class=18)
    images(in_tmp / "five", per_class=3)
    (in_tmp / "five" / "b" / "2.png").unlink()
    images(in_tmp / "split" / "train", per_class=3)
    images(in_tmp / "split" / "val", per_class=1)
    images(in_tmp / "broken")
    for name in "ab":
        for index in range(3):
            (in_tmp / "broken" / name / f"{index}.png").write_text("not an image")
    assert exit_message([*LEAN, f"--data.root={root}", *flags]) == f"error: {message}"
    assert not checkpoints(in_tmp)


def test_a_few_images_train_with_the_fitted_batch(in_tmp: Path) -> None:
    """The fitted default batch (8 at least) shrinks to the 3 training images instead of training 0 steps."""
    images(in_tmp / "pets", per_class=2)
    cli = train([*LEAN, "--data.root=pets"])
    assert cli.datamodule.batch_size == 3 and cli.trainer.global_step == 1 and checkpoints(in_tmp)


def test_the_batch_must_fit_the_images_each_device_gets() -> None:
    """Under DDP each of 2 devices gets 7 of 13 images (the sampler pads): the check agrees with the real loader."""
    for batch_size, steps in ((7, 1), (8, 0)):
        for rank in (0, 1):
            sampler = DistributedSampler(range(13), num_replicas=2, rank=rank, shuffle=True, seed=0)
            assert len(DataLoader(range(13), batch_size=batch_size, sampler=sampler, drop_last=True)) == steps
    refuse_idle_epochs(13, 7, 2, "pets")
    with pytest.raises(UserError) as refused:
        refuse_idle_epochs(13, 8, 2, "pets")
    assert str(refused.value).startswith(
        "--data.batch_size 8 is larger than the 13 training images of pets, 7 for each of the 2 devices: every epoch "
        "would train 0 steps"
    )
    assert fitted_batch_size(13, 2) == 7


def test_split_folders_without_images_or_read_as_classes_are_refused(in_tmp: Path) -> None:
    images(in_tmp / "pets")
    images(in_tmp / "pets" / "val", per_class=2)  # no pets/train: val would be a third class, of a's and b's images
    assert exit_message([*LEAN, "--data.root=pets"]) == (
        "error: pets/val holds class folders of pets (a, b): a val split, but without a pets/train folder it is read "
        "as one more class, val; move the training class folders into pets/train"
    )
    images(in_tmp / "split" / "train")
    (in_tmp / "split" / "test").mkdir()
    assert exit_message([*LEAN, "--data.root=split"]) == (
        "error: split/test: no class folders; put images in split/test/<class name>/"
    )
    for name in "ab":
        (in_tmp / "split" / "test" / name).mkdir()
    message = exit_message([*LEAN, "--data.root=split"])
    assert message.startswith("error: class folders without usable images: split/test/a, split/test/b; add images")
    assert not checkpoints(in_tmp)


# Class 5: images and settings whose preprocessing would take gigabytes.


def thin_png(path: Path, width: int = 1, height: int = 2_000_000) -> Path:
    """A PNG within Pillow's pixel limit (2 M pixels, 4 KB) that a resize to 8 makes 128 M pixels."""
    Image.new("L", (width, height), 200).save(path)
    return path


def test_an_image_that_resizing_would_blow_up_is_refused_at_setup_and_in_the_loader(in_tmp: Path) -> None:
    images(in_tmp / "pets")
    thin_png(in_tmp / "pets" / "a" / "thin.png")
    thin_png(in_tmp / "pets" / "b" / "wide.png", width=2_000_000, height=1)
    assert (in_tmp / "pets" / "a" / "thin.png").stat().st_size < 4000
    wide = f"2000000 x 1 pixels, which resizing to 8 makes 16000000 x 8, 128 M pixels: {LIMIT}"
    assert exit_message([*LEAN, "--data.root=pets"]) == (
        f"error: 2 unreadable image files: pets/a/thin.png ({THIN}), pets/b/wide.png ({wide}); delete or replace "
        "them, or pass --data.on_bad_image skip to train without them"
    )
    assert not checkpoints(in_tmp)

    # Unchecked at setup: the loader hands it over as a bad image, at no cost, and the run stops naming it ...
    (in_tmp / "pets" / "b" / "wide.png").unlink()
    unchecked = [*LEAN, *ALL_BATCHES, "--data.root=pets", "--data.check_images=none", "--data.batch_size=4"]
    assert exit_message(unchecked) == (
        f"error: cannot read pets/a/thin.png ({THIN}); delete or replace them, or pass --data.on_bad_image skip to "
        "train without them (--data.check_images full finds every such file before training)"
    )
    assert not checkpoints(in_tmp)
    # ... or trains without it.
    with pytest.warns(UserWarning, match=f"pets/a/thin.png \\({THIN[:20]}"):
        cli = train([*unchecked, "--data.on_bad_image=skip"])
    assert cli.trainer.global_step > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--data.resize_size=60000"],
            f"--data.resize_size 60000 makes every image at least 60000 x 60000 pixels, 3,600 M: {LIMIT}; at most "
            "9459 fits",
        ),
        (
            ["--data.crop_size=10000", "--data.resize_size=10000"],
            f"--data.crop_size 10000 makes every image at least 10000 x 10000 pixels, 100 M: {LIMIT}; at most 9459 "
            "fits",
        ),
    ],
)
def test_sizes_that_make_every_image_too_large_are_refused(in_tmp: Path, flags: list[str], message: str) -> None:
    images(in_tmp / "pets")
    assert exit_message([*LEAN, "--data.root=pets", *flags]) == f"error: {message}"
    assert not checkpoints(in_tmp)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of 8-pixel images (resize_size 8), trained in a few steps."""
    workdir = tmp_path_factory.mktemp("hostile_predict")
    old = Path.cwd()
    os.chdir(workdir)
    try:
        images(workdir / "pets")
        cli = train([*LEAN, "--data.root=pets"])
    finally:
        os.chdir(old)
    return workdir / cli.trainer.checkpoint_callback.best_model_path


def script(name: str) -> ModuleType:
    """The repository's script ``name``, imported, to call its ``main`` in this process."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_exit(name: str, *args: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        script(name).main(list(args))
    return str(stopped.value.code)


def test_predict_refuses_an_image_that_would_blow_up_and_answers_the_others(checkpoint: Path, tmp_path: Path) -> None:
    images(tmp_path, names="g", per_class=2)
    thin_png(tmp_path / "thin.png")
    files = ["g/0.png", "thin.png", "g/1.png"]
    result = run("predict.py", *files, "--checkpoint", str(checkpoint), "--csv", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: thin.png: refused, {THIN}",
        "error: 1 of 3 images could not be read or were refused",
    ]
    assert [row.split(",")[0] for row in result.stdout.splitlines()[1:]] == ["g/0.png", "g/1.png"]

    # In Python, and in export.py's parity images, the same refusal
    with pytest.raises(UserError, match=f"^image 1 of the batch: refused, {THIN[:30]}"):
        Predictor(checkpoint)([Image.open(tmp_path / name).convert("RGB") for name in files])
    message = script_exit("export.py", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--formats",
                          "--images", str(tmp_path / "thin.png"))  # fmt: skip
    assert message == f"error: --images {tmp_path / 'thin.png'}: refused, {THIN}"


def test_a_model_whose_preprocess_would_blow_up_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint's or an exported model.json's sizes: 60000 asks for 43 GB of float32 an image."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["hyper_parameters"]["preprocess"]["crop_size"] = 60000
    torch.save(saved, tmp_path / "hostile.ckpt")
    spec, weights = load_weights(checkpoint)
    spec.preprocess["resize_size"] = 100000
    write_bundle(tmp_path / "bundle", spec, weights, {})  # what export.py writes, with one value changed
    Image.new("RGB", (12, 12)).save(tmp_path / "x.png")
    what = "makes every image at least {0} x {0} pixels, {1} M: " + LIMIT + "; at most 9459 fits"
    fix = "; correct preprocess there, or export again with export.py"
    for model, named, key, size, megapixels, then in [
        ("hostile.ckpt", "hostile.ckpt", "crop_size", 60000, "3,600", ""),
        ("bundle", f"bundle/{MANIFEST}", "resize_size", 100000, "10,000", fix),
    ]:
        message = script_exit("predict.py", str(tmp_path / "x.png"), "--checkpoint", str(tmp_path / model))
        assert message == (
            f"error: {tmp_path / named}: refused, its preprocess {key} {size} {what.format(size, megapixels)}{then}"
        )
