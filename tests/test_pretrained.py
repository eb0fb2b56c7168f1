"""Starting from weights offline: torchvision's cache, Lightning checkpoints, state dict and safetensors files."""

import logging
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import torchvision
import yaml
from helpers import QUICK, run, train
from safetensors.torch import save_file

from imgcls.backbones.factory import create_backbone
from imgcls.backbones.weights import resolve_weights
from imgcls.errors import UserError

RESNET18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def plant_resnet18(torch_home: Path) -> dict[str, torch.Tensor]:
    """Save a randomly initialised resnet18 where torchvision's cache keeps ``ResNet18_Weights.IMAGENET1K_V1``."""
    path = torch_home / "hub" / "checkpoints" / Path(urlparse(RESNET18.url).path).name  # resnet18-f37072fd.pth
    path.parent.mkdir(parents=True)
    planted = torchvision.models.resnet18().state_dict()
    torch.save(planted, path)
    return planted


def resnet18(num_classes: int, pretrained: bool | str, **kwargs) -> torch.nn.Module:
    """resnet18 as the model builds it from --model.pretrained."""
    return create_backbone("resnet18", num_classes, resolve_weights("resnet18", pretrained), **kwargs)


def backbone_equals(net: torch.nn.Module, expected: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether every tensor of ``net`` but its ``fc`` head equals ``expected[prefix + name]``."""
    own = {name: tensor for name, tensor in net.state_dict().items() if not name.startswith("fc.")}
    return len(own) == 120 and all(torch.equal(tensor, expected[prefix + name]) for name, tensor in own.items())


@pytest.mark.parametrize("pretrained", [True, "IMAGENET1K_V1"])
def test_pretrained_loads_the_weights_torchvision_cached(torch_home: Path, pretrained: bool | str) -> None:
    planted = plant_resnet18(torch_home)
    reports: list[str] = []
    net = resnet18(7, pretrained, report=reports.append)
    assert backbone_equals(net, planted)  # random planted values: equal only if these very tensors were loaded
    assert net.fc.out_features == 7
    assert reports == [
        "resnet18 IMAGENET1K_V1: loaded 120 of 122 tensors\n"
        "  shape mismatch, kept as initialised: fc.weight [1000, 512] in the file, [7, 512] here, "
        "fc.bias [1000] in the file, [7] here"
    ]


@pytest.mark.slow
def test_training_from_cached_weights_takes_their_preprocessing(
    in_tmp: Path, torch_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plant_resnet18(torch_home)
    tiny = ["--data.batch_size=8", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    with caplog.at_level(logging.INFO):  # the report goes through Lightning's logger, on global rank 0
        cli = train([*QUICK, *tiny, "--model.pretrained=true", "--data.crop_size=null", "--data.resize_size=null"])
    assert "resnet18 IMAGENET1K_V1: loaded 120 of 122 tensors" in caplog.text
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    transforms = RESNET18.transforms()  # what torchvision says these weights expect
    assert ckpt["hyper_parameters"]["preprocess"] == {
        "crop_size": transforms.crop_size[0],
        "resize_size": transforms.resize_size[0],
        "mean": transforms.mean,
        "std": transforms.std,
        "interpolation": "bilinear",
    }
    config = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert (config["data"]["crop_size"], config["data"]["resize_size"]) == (224, 256)


@pytest.mark.slow
def test_missing_weights_offline_say_which_file_to_put_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # a closed port: no network, wherever the test runs
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("NO_PROXY", "")
    home = tmp_path / "empty_torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    result = run("train.py", "--model.pretrained=true", *QUICK, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert f"download that file where there is internet and put it at {expected}" in result.stderr
    assert RESNET18.url in result.stderr


def test_partial_load_from_a_lightning_checkpoint_with_other_classes(trained: Path) -> None:
    ckpt = trained / "checkpoints" / "best.ckpt"  # 10 digit classes
    reports: list[str] = []
    net = resnet18(3, str(ckpt), report=reports.append)
    assert backbone_equals(net, torch.load(ckpt, weights_only=True)["state_dict"], prefix="net.")
    assert net.fc.out_features == 3
    assert reports == [
        f"{ckpt}: loaded 120 of 122 tensors\n"
        "  shape mismatch, kept as initialised: fc.weight [10, 512] in the file, [3, 512] here, "
        "fc.bias [10] in the file, [3] here"
    ]


def test_wrapper_and_configured_prefixes_are_stripped(tmp_path: Path) -> None:
    source = torchvision.models.resnet18().state_dict()
    wrapped = {f"module._orig_mod.{name}": tensor for name, tensor in source.items()}  # DDP around torch.compile
    save_file(wrapped, tmp_path / "ddp.safetensors")
    net = resnet18(5, str(tmp_path / "ddp.safetensors"), report=lambda _: None)
    assert backbone_equals(net, source)
    nested = {f"student.encoder.{name}": tensor for name, tensor in source.items()}
    torch.save({"model": nested, "epoch": 3}, tmp_path / "distill.pth")  # torchvision's reference-script layout
    net = resnet18(5, str(tmp_path / "distill.pth"), prefix="student.encoder.", report=print)
    assert backbone_equals(net, source)


def test_strict_turns_tensors_that_do_not_fit_into_an_error(tmp_path: Path) -> None:
    source = torchvision.models.resnet18().state_dict()
    del source["layer4.1.bn2.running_var"]
    source["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(source, path)
    reports: list[str] = []
    resnet18(5, str(path), report=reports.append)
    assert "loaded 119 of 122 tensors" in reports[0]
    assert "missing from the file, kept as initialised: layer4.1.bn2.running_var" in reports[0]
    assert "in the file but not in the model, ignored: extra.weight" in reports[0]
    with pytest.raises(UserError, match="2 tensors do not fit, and loading is strict: layer4.1.bn2.running_var, extra"):
        resnet18(5, str(path), strict=True)  # the replaced head is expected not to fit


@pytest.mark.slow
def test_published_vit_weights_are_resized_to_the_data_as_torchvision_resizes_its_own(
    torch_home: Path, in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = torchvision.models.ViT_B_16_Weights.DEFAULT  # 224-pixel position embeddings: 197 tokens
    path = torch_home / "hub" / "checkpoints" / Path(urlparse(weights.url).path).name
    path.parent.mkdir(parents=True)
    planted = torchvision.models.vit_b_16().state_dict()
    torch.save(planted, path)
    one_step = [*QUICK, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.max_steps=0"]
    with caplog.at_level("INFO"):
        cli = train([*one_step, "--model.backbone=vit_b_16", "--model.pretrained=true", "--data.crop_size=32",
                     "--data.resize_size=32"])  # fmt: skip
    from torchvision.models.vision_transformer import interpolate_embeddings

    expected = interpolate_embeddings(32, 16, {"encoder.pos_embedding": planted["encoder.pos_embedding"]})
    assert cli.model.net.encoder.pos_embedding.shape == (1, 5, 768)  # 2x2 patches and the class token
    assert torch.equal(cli.model.net.encoder.pos_embedding.detach(), expected["encoder.pos_embedding"])
    report = next(record.getMessage() for record in caplog.records if "loaded" in record.getMessage())
    assert report.startswith("vit_b_16 IMAGENET1K_V1: loaded 150 of 152 tensors") and "pos_embedding" not in report
