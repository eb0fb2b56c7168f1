"""Hostile input, issue #18, class 1 (part of the hostile-input suite): files that would run code, connect, or block.

A checkpoint, a weights file, a sharded folder or an exported folder is data: loading one may read tensors and plain
values only. Each case below plants a file that, read carelessly, would run a command (it touches a marker file),
fetch something (it would connect to a listener the test runs on this machine, standing in for a hub), or block on
a pipe; each is refused in one line naming the file and the entry, with nothing run, no connection, no hang. More
variants of this class: tests/test_reliability.py (shards and .metadata payloads through every script) and
tests/test_predict.py.
"""

import json
import os
import pickle
import runpy
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import QUICK, REPO, exit_message, run, shell_env
from PIL import Image

from imgcls.errors import UserError
from imgcls.inference.exported import MANIFEST, STATE_DICT
from imgcls.model import ImageClassifier

CLASSES = ["a", "b"]
PREPROCESS = {"crop_size": 8, "resize_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
READ_ONLY_DATA = "only tensors and plain data load from checkpoints"
BUILT_PLAINLY = "only an architecture and plain builder arguments load from a file"


class Touch:
    """Unpickled, it runs a command: the classic payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def listener() -> Iterator[tuple[str, list]]:
    """A TCP server on this machine that records every connection: a hub a hostile file would make us contact."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    connections: list = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            connections.append(connection.recv(200))
            connection.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    stop.set()
    thread.join()
    server.close()


def checkpoint(path: Path, changes: dict) -> Path:
    """A checkpoint as this project writes one (a fresh 2-class resnet18), with the hyperparameters ``changes``."""
    module = ImageClassifier("resnet18", num_classes=2, class_names=CLASSES, preprocess=PREPROCESS)
    module.configure_model()
    torch.save({"hyper_parameters": {**dict(module.hparams), **changes}, "state_dict": module.state_dict()}, path)
    return path


def predict(folder: Path, model: Path, hub: str | None = None) -> tuple[int, str]:
    """predict.py on one image with ``model``: the exit status and the last line of stderr. With ``hub``, as a user
    runs it, in a process whose Hugging Face hub is ``hub``; else in this process (fast)."""
    Image.new("RGB", (8, 8)).save(folder / "img.png")
    args = [str(folder / "img.png"), "--checkpoint", str(model)]
    if hub is None:
        with pytest.raises(SystemExit) as stopped:
            runpy.run_path(str(REPO / "predict.py"))["main"](args)
        return 1, str(stopped.value.code)
    env = shell_env(HF_ENDPOINT=hub, HF_HUB_OFFLINE="0")
    result = run("predict.py", *args, cwd=folder, deadline=120, env=env)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.returncode, result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("hparams", "refused"),
    [
        ({"backbone": "timm/hf-hub:someone/resnet18"}, "its backbone timm/hf-hub:someone/resnet18 would be fetched "
         "from a hub"),
        ({"backbone_kwargs": {"weights": "DEFAULT"}},
         "builder arguments 'weights' would make the builder load weights"),
        ({"backbone": "timm/resnet18", "backbone_kwargs": {"pretrained": True, "checkpoint_path": "evil.pth"}},
         "builder arguments 'checkpoint_path', 'pretrained' would make the builder load weights"),
        ({"backbone_kwargs": {"norm_layer": "x", "zero_init_residual": {"a": [1, {"b": b"bytes"}]}}},
         "its builder argument 'zero_init_residual' is {'a': [1, {'b': b'bytes'}]}"),
    ],
    ids=["hub-name", "torchvision-download", "timm-load", "not-plain"],
)  # fmt: skip
def test_a_checkpoint_whose_network_would_load_or_fetch_something_is_refused(
    tmp_path: Path, listener: tuple[str, list], hparams: dict, refused: str
) -> None:
    hub, connections = listener
    torch.save({"x": Touch(tmp_path / "pwned")}, tmp_path / "evil.pth")
    # The file that names a hub as a user runs it: in a process of its own, whose hub is the listener.
    in_a_process = hub if "hf-hub" in hparams.get("backbone", "") else None
    status, line = predict(tmp_path, checkpoint(tmp_path / "hostile.ckpt", hparams), in_a_process)
    assert status == 1 and line == f"error: {tmp_path / 'hostile.ckpt'}: refused, {refused}; {BUILT_PLAINLY}"
    assert not connections and not (tmp_path / "pwned").exists()
    with pytest.raises(UserError, match="refused"):  # the Python API reads the same file the same way
        ImageClassifier.load_from_checkpoint(tmp_path / "hostile.ckpt", weights_only=True)


def test_an_exported_folder_cannot_point_at_a_pipe_a_device_or_another_folder(tmp_path: Path) -> None:
    bundle = tmp_path / "exported"
    bundle.mkdir()
    os.mkfifo(bundle / "pipe")  # reading it would block until someone writes
    torch.save({}, tmp_path / "elsewhere.pt")
    manifest = {"format_version": 1, "library": "torchvision", "arch": "resnet18", "arch_kwargs": {},
                "num_classes": 2, "class_names": CLASSES, "preprocess": PREPROCESS}  # fmt: skip
    for name in ["pipe", "/dev/zero", "../elsewhere.pt", str(tmp_path / "elsewhere.pt"), ".."]:
        (bundle / MANIFEST).write_text(json.dumps({**manifest, "files": {"state_dict": name}}))
        status, line = predict(tmp_path, bundle)
        assert status == 1, line
        assert line.startswith(f"error: {bundle / MANIFEST}: its state_dict file {name!r} is not a file in {bundle}")


def test_payloads_anywhere_in_a_file_are_refused_before_they_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    module = ImageClassifier("resnet18", num_classes=2, class_names=CLASSES, preprocess=PREPROCESS)
    module.configure_model()
    hparams, weights = dict(module.hparams), module.state_dict()
    # Deep in the hyperparameters; in place of one tensor; as the whole state dict of an exported folder.
    torch.save({"hyper_parameters": {**hparams, "extra": [{"x": Touch(marker)}]}, "state_dict": weights},
               tmp_path / "in_hparams.ckpt")  # fmt: skip
    torch.save({"hyper_parameters": hparams, "state_dict": {**weights, "net.fc.bias": Touch(marker)}},
               tmp_path / "in_weights.ckpt")  # fmt: skip
    bundle = tmp_path / "exported"
    bundle.mkdir()
    torch.save(Touch(marker), bundle / STATE_DICT)
    manifest = {"format_version": 1, "library": "torchvision", "arch": "resnet18", "arch_kwargs": {},
                "num_classes": 2, "class_names": CLASSES, "preprocess": PREPROCESS,
                "files": {"state_dict": STATE_DICT}}  # fmt: skip
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    # A checkpoint written by hand as torch.save writes one, whose pickle calls builtins.exec directly.
    with zipfile.ZipFile(tmp_path / "by_hand.ckpt", "w") as archive:
        archive.writestr("by_hand/data.pkl", b"cbuiltins\nexec\n(Vopen('%s', 'w')\ntR." % str(marker).encode())
        archive.writestr("by_hand/version", "3\n")
    for model, asks in [("in_hparams.ckpt", "posix.system"), ("in_weights.ckpt", "posix.system"),
                        ("exported", None), ("by_hand.ckpt", "exec")]:  # fmt: skip
        status, line = predict(tmp_path, tmp_path / model)
        assert status == 1 and model in line, line
        if asks:
            assert line.endswith(f"refused, it asks to import {asks}; {READ_ONLY_DATA}"), line
    assert not marker.exists()


def test_pretrained_weights_and_resume_read_the_same_way(in_tmp: Path) -> None:
    marker = in_tmp / "pwned"
    torch.save({"fc.weight": Touch(marker)}, in_tmp / "evil.pth")
    (in_tmp / "evil.pt").write_bytes(pickle.dumps(Touch(marker)))  # a plain pickle, not torch.save's format
    for flag in ["--model.pretrained=evil.pth", "--model.pretrained=evil.pt", "--ckpt_path=evil.pth"]:
        line = exit_message([*QUICK, flag])
        assert line.startswith("error: ") and "evil.pt" in line, line
        assert "asks to import posix.system" in line or "not a readable" in line, line
    assert not marker.exists() and not list(in_tmp.glob("logs/**/*.ckpt"))
