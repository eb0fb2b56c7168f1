"""Messy image folders: unreadable files reported with their paths, every image mode as RGB, class folder mistakes."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import QUICK, exit_message, train
from PIL import Image

from imgcls.data.checks import BadBatch, BadImage, collate
from imgcls.data.images import open_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

LEAN = [*QUICK, "--data.batch_size=4", "--trainer.callbacks=null", "--trainer.enable_model_summary=false",
        "--inspection.every_n_steps=0", "--data.crop_size=8", "--data.resize_size=8"]  # fmt: skip


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def classes(root: Path, names: str = "ab", per_class: int = 6) -> None:
    """Small, valid, noisy RGB PNGs in one folder per class."""
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


def two_pixels(mode: str, first: tuple[int, ...], second: tuple[int, ...]) -> Image.Image:
    image = Image.new(mode, (2, 1), first)
    image.putpixel((1, 0), second)
    return image


def test_unreadable_images_are_listed_with_their_paths_and_the_fix(in_tmp: Path) -> None:
    classes(in_tmp / "pets" / "train")
    classes(in_tmp / "pets" / "val", per_class=3)  # cut.jpg, last, shares a batch
    (in_tmp / "pets" / "train" / "a" / "empty.png").write_bytes(b"")
    (in_tmp / "pets" / "train" / "a" / "page.jpg").write_text("<html>a web page saved as .jpg</html>")
    # A 30000 x 30000 PNG in 57 bytes: its header alone asks for 900 megapixels.
    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")
    (in_tmp / "pets" / "train" / "b" / "bomb.png").write_bytes(bomb)
    jpeg = in_tmp / "whole.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    (in_tmp / "pets" / "val" / "b" / "cut.jpg").write_bytes(jpeg.read_bytes()[:1500])  # header intact, pixels cut

    message = exit_message([*LEAN, "--data.root=pets"])
    assert message.startswith("error: 3 unreadable image files: ")
    assert "pets/train/a/empty.png (empty file, 0 bytes)" in message
    assert "pets/train/a/page.jpg (not an image file Pillow can read)" in message
    assert "pets/train/b/bomb.png (refused as a possible decompression bomb: Image size (900000000 pixels)" in message
    assert message.endswith("delete or replace them, or pass --data.on_bad_image skip to train without them")
    assert "cut.jpg" not in message  # a header check cannot see missing pixels; a full decode can:
    message = exit_message([*LEAN, "--data.root=pets", "--data.check_images=full"])
    assert "4 unreadable image files" in message
    assert "pets/val/b/cut.jpg (corrupt or truncated: OSError: image file is truncated" in message

    # Skipping: setup drops the three it found; the loader drops the truncated one from its batch when it meets it.
    everything = ["--trainer.limit_train_batches=null", "--trainer.limit_val_batches=null"]
    with pytest.warns(UserWarning) as warned:
        cli = train([*LEAN, *everything, "--data.root=pets", "--data.on_bad_image=skip"])
    skipped = {str(w.message).split(" (")[0] for w in warned if "skipped" in str(w.message)}
    assert skipped == {f"pets/{name}" for name in ("train/a/empty.png", "train/a/page.jpg", "train/b/bomb.png",
                                                    "val/b/cut.jpg")}  # fmt: skip
    assert torch.isfinite(cli.trainer.callback_metrics["test/loss"])
    assert (len(cli.datamodule.datasets["train"]), len(cli.datamodule.datasets["val"])) == (12, 7)

    # Not checked at setup and not skipped: training stops at the batch that holds it, naming it, without a traceback.
    message = exit_message([*LEAN, *everything, "--data.root=pets", "--data.check_images=none"])
    assert message.startswith("error: cannot read pets/val/b/cut.jpg (corrupt or truncated: OSError: image file is")
    assert message.endswith("(--data.check_images full finds every such file before training)")

    # A batch with nothing but unreadable images has nothing left to skip to: that stops, with the way out.
    cut = BadImage("pets/val/b/cut.jpg", "truncated")
    assert collate([cut], on_bad="skip") == BadBatch(
        "every image of a batch is unreadable: pets/val/b/cut.jpg (truncated); delete or replace them, or pass "
        "--data.check_images full to leave such files out before training"
    )


def test_every_image_mode_opens_as_the_rgb_a_viewer_shows(tmp_path: Path) -> None:
    red, white = (255, 0, 0), (255, 255, 255)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 0])
    palette.putpixel((1, 0), 1)
    cases = {  # file name: (image, pixel (0, 0) and pixel (1, 0) as RGB)
        "gray.png": (Image.fromarray(np.array([[0, 200]], dtype=np.uint8)), [(0, 0, 0), (200, 200, 200)]),
        "bilevel.png": (Image.fromarray(np.array([[0, 1]], dtype=bool)), [(0, 0, 0), white]),
        "rgba.png": (two_pixels("RGBA", (255, 0, 0, 255), (0, 0, 0, 0)), [red, white]),  # transparent black
        "gray_alpha.png": (two_pixels("LA", (90, 255), (0, 0)), [(90, 90, 90), white]),
        "palette.png": (palette, [red, white]),  # palette entry 1 is black and transparent
        "gray16.png": (Image.fromarray(np.array([[32768, 65535]], dtype=np.uint16)), [(128,) * 3, white]),
        "gray32.tif": (Image.fromarray(np.array([[257 * 40, 65535]], dtype=np.int32)), [(40,) * 3, white]),
        "cmyk.jpg": (Image.new("RGB", (2, 1), red).convert("CMYK"), [red, red]),  # JPEG: Adobe's inverted CMYK
        "cmyk.tif": (Image.new("RGB", (2, 1), (0, 0, 255)).convert("CMYK"), [(0, 0, 255)] * 2),
        # 32-bit floats: 0 to 1 by convention; a file whose values pass 1 stores them on the 0-255 scale
        "float01.tif": (Image.fromarray(np.array([[0.5, 1.0]], dtype=np.float32)), [(128,) * 3, white]),
        "float255.tif": (Image.fromarray(np.array([[40.0, 255.0]], dtype=np.float32)), [(40,) * 3, white]),
    }
    for name, (image, _) in cases.items():
        if name == "palette.png":
            image.save(tmp_path / name, transparency=1)
        else:
            image.save(tmp_path / name, **({"quality": 100} if name.endswith(".jpg") else {}))
    modes = {name: Image.open(tmp_path / name).mode for name in cases}
    assert modes == {"gray.png": "L", "bilevel.png": "1", "rgba.png": "RGBA", "gray_alpha.png": "LA",
                     "palette.png": "P", "gray16.png": "I;16", "gray32.tif": "I", "cmyk.jpg": "CMYK",
                     "cmyk.tif": "CMYK", "float01.tif": "F", "float255.tif": "F"}  # fmt: skip
    for name, (_, expected) in cases.items():
        opened = open_image(tmp_path / name)
        assert opened.mode == "RGB", name
        got = [opened.getpixel((0, 0)), opened.getpixel((1, 0))]
        assert np.abs(np.subtract(got, expected)).max() <= 2, (name, got, expected)  # JPEG rounds a little


def test_class_folder_mistakes_name_the_folders(in_tmp: Path) -> None:
    classes(in_tmp / "one", names="a")
    message = exit_message([*LEAN, "--data.root=one"])
    assert message == (
        "error: one: a single class folder, one/a; a classifier needs two or more, so put each class's images "
        "in a folder of its own under one"
    )

    classes(in_tmp / "gifs", names="ab")
    (in_tmp / "gifs" / "c").mkdir()
    Image.new("RGB", (4, 4)).save(in_tmp / "gifs" / "c" / "0.gif")
    message = exit_message([*LEAN, "--data.root=gifs"])
    assert message.startswith("error: class folders without usable images: gifs/c; add images (.jpg, .jpeg, .png")
    assert message.endswith("or remove the folders; other files there are not read: .gif")

    for split, names in {"train": "abc", "val": "abd", "test": "abc"}.items():
        classes(in_tmp / "split" / split, names=names, per_class=2)
    message = exit_message([*LEAN, "--data.root=split"])
    assert message == (
        "error: split/val: its class folders differ from the training classes (no val folder for split/train/c; "
        "split/val/d not in split/train); give split/val the same class folders as split/train"
    )

    (in_tmp / "split" / "val" / "d").rename(in_tmp / "split" / "val" / "c")
    for image in (in_tmp / "split" / "test" / "b").iterdir():
        image.unlink()
    message = exit_message([*LEAN, "--data.root=split"])
    assert message.startswith("error: class folders without usable images: split/test/b;")
