"""Backbones by name: each torchvision family and timm, a head sized to the classes, the weights' preprocessing."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import QUICK, train
from PIL import Image
from torch import nn

from imgcls.backbones.factory import create_backbone, head_names
from imgcls.backbones.weights import available_backbones, resolve_weights
from imgcls.data.transforms import build_transforms
from imgcls.errors import UserError

# The smallest model of each torchvision family; the head sits somewhere else in nearly every family.
FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_y_400mf", "resnet18", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11", "vit_b_16", "wide_resnet50_2",
]  # fmt: skip


def family(name: str) -> str:
    return re.sub(r"[\d_].*", "", name)  # efficientnet_v2_s -> efficientnet


def test_the_sample_covers_every_torchvision_family() -> None:
    assert {family(name) for name in available_backbones()} == {family(name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_gets_a_head_sized_to_the_classes(name: str) -> None:
    # On the meta device: shapes without memory. RegNet's builder computes its widths with tensors, so it is real.
    with torch.device("cpu" if name.startswith("regnet") else "meta"):
        net = create_backbone(name, 7)
    (head,) = head_names(net)
    layer = net.get_submodule(head)
    assert (layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels) == 7


@pytest.mark.parametrize(("name", "weights"), [("resnet50", "IMAGENET1K_V2"), ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")])
def test_preprocessing_matches_the_torchvision_weights_transforms(name: str, weights: str) -> None:
    ours = build_transforms(train=False, **resolve_weights(name, weights).preprocess())
    theirs = torchvision.models.get_model_weights(name)[weights].transforms()  # PIL resize, bicubic for SWAG
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    a, b = ours(image), theirs(image)
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 1e-3 and (a - b).abs().max() < 0.02  # at most one level of 255 apart


def test_weights_that_change_the_network_are_recorded_to_rebuild_it() -> None:
    from imgcls.model import ImageClassifier

    model = ImageClassifier("vit_b_16", pretrained="IMAGENET1K_SWAG_E2E_V1", num_classes=3)
    assert model.hparams.backbone_kwargs == {"image_size": 384}  # SWAG weights: 384-pixel position embeddings
    with torch.device("meta"):
        net = create_backbone(
            "vit_b_16", 3, **model.hparams.backbone_kwargs
        )  # as imgcls.inference.predictor rebuilds it
    assert net.encoder.pos_embedding.shape == (1, (384 // 16) ** 2 + 1, 768)


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [
        ("resnet19", False, "--model.backbone 'resnet19' is not a torchvision classification model; did you mean"),
        ("resnet18", "IMAGENET1K_V9", "resnet18 has the weights IMAGENET1K_V1 (true: the default)"),
        ("resnet18", "weights/missing.pth", "--model.pretrained weights/missing.pth: no such file"),
    ],
)
def test_wrong_names_fail_with_one_clear_line(name: str, pretrained: bool | str, message: str) -> None:
    with pytest.raises(UserError) as error:
        create_backbone(name, 3, resolve_weights(name, pretrained))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_timm_names_and_preprocessing() -> None:
    timm = pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]' (CI installs it)")
    with pytest.raises(UserError, match=r"is not a timm model; did you mean timm/resnet50"):
        create_backbone("timm/resnet5O", 3)
    with pytest.raises(UserError, match=r"timm has no such weights; it has e.g. timm/resnet50.a1_in1k"):
        resolve_weights("timm/resnet50.nope", True).preprocess()
    cfg = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("resnet50.a1_in1k").to_dict())
    theirs = timm.data.create_transform(**cfg)  # timm's own evaluation transform: bicubic, crop_pct 0.95
    ours = build_transforms(train=False, **resolve_weights("timm/resnet50.a1_in1k", True).preprocess())
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    a, b = ours(image), theirs(image)
    assert a.shape == b.shape == (3, 224, 224) and (a - b).abs().mean() < 1e-3


@pytest.mark.slow
def test_timm_backbone_trains_a_step_and_predicts(in_tmp: Path) -> None:
    pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]' (CI installs it)")
    from imgcls.data.images import open_image
    from imgcls.inference.predictor import Predictor

    cli = train([*QUICK, "--model.backbone=timm/test_resnet", "--trainer.limit_train_batches=1"])
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["test/loss"])
    predictor = Predictor(cli.trainer.checkpoint_callback.best_model_path)  # rebuilds timm/test_resnet by name
    image = open_image(next((in_tmp / "data" / "digits" / "test" / "3").iterdir()))
    assert [len(p) for p in predictor([image], topk=3)] == [3]


# One backbone of each family trained on the default data (8x8 digits at 32 px), as a user picks it by name.
TRAINED_FAMILIES = [name for name in FAMILIES if name not in ("efficientnet_v2_s", "mobilenet_v2", "swin_v2_t")]
SIZED = {  # what the size rule gives at the default 32 px (imgcls.backbones.input_size); the rest run at 32
    "vit_b_16": ("built for 32-pixel images", {"image_size": 32}, 32),
    "timm/vit_tiny_patch16_224": ("built for 32-pixel images", {"img_size": 32}, 32),
    "maxvit_t": ("the data's crop becomes 224 pixels", {}, 224),
    "inception_v3": ("the data's crop becomes 75 pixels", {}, 75),
    "alexnet": ("the data's crop becomes 63 pixels", {}, 63),
}


# --plan for the networks whose size the rule changes: they could not be planned before it. The others run at the
# data's own size, as they always did, and their plans are tested in test_plan.py (a plan of a densenet takes a
# minute and a half on a 2-core CPU). MaxViT and Inception take the same path as AlexNet (the data takes its size),
# at 224 and 75 pixels, where their plans take a minute or more (CI time); torchvision's ViT the path of timm's
# (built for the data's size), and takes a minute.
PLANNED = {"timm/vit_tiny_patch16_224", "alexnet"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*TRAINED_FAMILIES, "timm/vit_tiny_patch16_224"])
def test_every_family_trains_a_step_on_the_default_data_and_plans(
    name: str, in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if name.startswith("timm/"):
        pytest.importorskip("timm", reason="timm is not installed: pip install -e '.[timm]' (CI installs it)")
    from imgcls.data.images import open_image
    from imgcls.inference.predictor import Predictor

    one_step = ["--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    # best.ckpt without optimizer state, and no last.ckpt: VGG's and AlexNet's are gigabytes, and resuming is
    # tested elsewhere; the checkpoint here is for rebuilding the network.
    small = ["--checkpoint.save_weights_only=true", "--checkpoint.save_last=false"]
    with caplog.at_level("INFO"):
        cli = train([*QUICK, *one_step, *small, f"--model.backbone={name}", "--data.batch_size=4"])
    said, kwargs, crop = SIZED.get(name, ("", {}, 32))
    assert cli.trainer.global_step == 1 and torch.isfinite(cli.trainer.callback_metrics["test/loss"])
    assert cli.datamodule.preprocess["crop_size"] == crop
    assert kwargs.items() <= (cli.model.hparams.backbone_kwargs or {}).items()
    assert not said or sum(said in record.getMessage() for record in caplog.records) == 1  # one line says which
    # The checkpoint rebuilds the same network: predict.py's path answers on a digit.
    predictor = Predictor(Path(cli.trainer.checkpoint_callback.best_model_path))
    digit = next((in_tmp / "data" / "digits" / "test" / "3").iterdir())
    assert len(predictor([open_image(digit)], topk=1)[0]) == 1
    if name in PLANNED:
        # A small device: the plan's rows without the search for the largest batch, which test_plan.py covers.
        plan = train(["--plan", f"--model.backbone={name}", "--data.batch_size=4", "--plan.device_memory=1MiB"]).plan
        assert plan.estimates and all(estimate.peak > 0 for estimate in plan.estimates)


def test_a_size_no_network_can_take_is_a_one_line_error(in_tmp: Path) -> None:
    fixed = ["--model.backbone=vit_b_16", "--model.backbone_kwargs={image_size: 32}", "--data.crop_size=48"]
    with pytest.raises(SystemExit) as stopped:
        train([*QUICK, *fixed, "--data.resize_size=48"])
    message = str(stopped.value.code)
    assert message.startswith("error: --model.backbone vit_b_16 runs neither on --data.crop_size 48 nor on its own")
    assert "\n" not in message and "--data.crop_size" in message


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [("{depth: 2}", "unexpected keyword argument 'depth'"), ("{image_size: 30}", "indivisible by patch size")],
)
def test_builder_arguments_the_backbone_does_not_take_are_a_one_line_error(
    in_tmp: Path, kwargs: str, reason: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        train([*QUICK, "--model.backbone=vit_b_16", f"--model.backbone_kwargs={kwargs}"])
    message = str(stopped.value.code)
    assert message.startswith("error: --model.backbone_kwargs {") and "vit_b_16 does not build with them" in message
    assert reason in message and "\n" not in message
