"""Finetuning from a checkpoint: a frozen backbone stays as loaded, unfreezing trains it, at its own learning rate."""

from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from helpers import QUICK, REPO, train

from imgcls.backbones.finetuning import UnfreezeBackbone
from imgcls.errors import UserError
from imgcls.model import ImageClassifier

PARAMETERS = {name for name, _ in torchvision.models.resnet18().named_parameters()}


def backbone(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The resnet18 tensors of an ImageClassifier state dict but its ``fc`` head: parameters and BatchNorm buffers."""
    return {k: v for k, v in state_dict.items() if k.startswith("net.") and not k.startswith("net.fc.")}


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in a if not torch.equal(a[name], b[name])}


@pytest.mark.slow
def test_finetune_config_trains_the_head_then_everything(trained: Path, in_tmp: Path) -> None:
    start = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    cli = train(
        [*QUICK, "--config", str(REPO / "configs" / "finetune.yaml"), "--trainer.max_epochs=2",
         f"--model.pretrained={trained / 'checkpoints' / 'best.ckpt'}", "--data.crop_size=32", "--data.resize_size=32",
         "--checkpoint.filename={epoch}", "--checkpoint.save_top_k=-1"]
    )  # fmt: skip
    saved = Path(cli.trainer.checkpoint_callback.dirpath)
    first, second = (torch.load(saved / f"epoch={e}.ckpt", weights_only=True) for e in (0, 1))
    assert differ(backbone(first["state_dict"]), backbone(start)) == set()  # epoch 0: frozen, BN statistics too
    assert differ({k: first["state_dict"][k] for k in ("net.fc.weight", "net.fc.bias")}, start) == {
        "net.fc.weight", "net.fc.bias"
    }  # fmt: skip
    changed = differ(backbone(second["state_dict"]), backbone(first["state_dict"]))  # epoch 1: unfrozen
    assert {f"net.{name}" for name in PARAMETERS if not name.startswith("fc.")} <= changed
    groups = {group["name"]: group for group in second["optimizer_states"][0]["param_groups"]}
    assert groups["backbone"]["initial_lr"] == pytest.approx(0.1 * groups["head"]["initial_lr"])
    assert len(groups["head"]["params"]) == 2  # fc.weight, fc.bias


@pytest.mark.slow
def test_freeze_backbone_trains_only_the_head(trained: Path, in_tmp: Path) -> None:
    start = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    pretrained = f"--model.pretrained={trained / 'checkpoints' / 'best.ckpt'}"
    cli = train([*QUICK, pretrained, "--model.freeze_backbone=true"])
    last = torch.load(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt", weights_only=True)["state_dict"]
    assert differ(backbone(last), backbone(start)) == set()
    assert not torch.equal(last["net.fc.weight"], start["net.fc.weight"])


def test_gradual_unfreezing_under_ddp_asks_for_unused_parameter_detection() -> None:
    def setup(strategy: str) -> None:  # the check runs before any process starts
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
        UnfreezeBackbone().setup(trainer, ImageClassifier(num_classes=3), "fit")

    with pytest.raises(UserError, match="needs --trainer.strategy=ddp_find_unused_parameters_true"):
        setup("ddp")
    setup("ddp_find_unused_parameters_true")
