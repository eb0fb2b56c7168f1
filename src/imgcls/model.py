"""The model: a backbone with a classification head, its loss, metrics and optimizer, as a LightningModule."""

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from imgcls.backbones import finetuning
from imgcls.backbones.factory import create_backbone
from imgcls.backbones.weights import Pretrained, resolve_weights
from imgcls.checkpoints import ModelSpec, read_metadata
from imgcls.data.padding import IGNORE_INDEX
from imgcls.parallel.blocks import compile_blocks, uncompile_blocks
from imgcls.parallel.deferred_init import build_deferred
from imgcls.parallel.fsdp2 import FSDP2Strategy
from imgcls.parallel.reduced import log_reduced

MONITOR = "val/acc"  # the metric that picks the best checkpoint


class ImageClassifier(L.LightningModule):
    """Classify images with a torchvision or timm backbone.

    Args:
        backbone: torchvision model name, e.g. ``resnet18``, ``vit_b_16``, ``convnext_tiny``, or ``timm/<name>``.
        backbone_kwargs: Extra arguments for the backbone's builder, e.g. ``{dropout: 0.0}``.
        pretrained: Starting weights: ``false``, ``true`` (the default weights), a torchvision weights name such
            as ``IMAGENET1K_V2``, or a file (``.pth``, ``.pt``, ``.ckpt``, ``.safetensors``) loaded partially:
            every tensor whose name and shape match. Left out of the checkpoint's hyperparameters (config.yaml
            has it), so loading a checkpoint never reads the starting weights again.
        pretrained_prefix: Stripped from the file's tensor names, besides ``module.``, ``model.``, ``backbone.``,
            ``net.``, ``_orig_mod.`` and ``_forward_module.``.
        pretrained_strict: Fail if a tensor outside the head does not fit, instead of skipping it.
        freeze_backbone: Train only the head; the backbone's BatchNorm layers keep their running statistics.
        backbone_lr_scale: The backbone's learning rate as a multiple of the head's (the optimizer's).
        num_classes: Number of classes; linked from the data module by the CLI.
        class_names: Class names in label order; linked from the data module and saved for prediction.
        preprocess: The data module's evaluation preprocessing; saved so prediction matches validation.
        label_smoothing: Cross-entropy label smoothing, from 0 (none) to 1.
        optimizer: Builds the optimizer from the parameters.
        lr_scheduler: Builds a scheduler stepped once per epoch; ``None`` uses linear warmup and cosine decay,
            stepped per batch.
        warmup_fraction: Share of all training steps spent in warmup by the default schedule, from 0 to 1.
        channels_last: Keep weights and images in channels-last memory order, which tensor cores want for
            convolutions under 16-bit precision on GPUs.
        compile: ``torch.compile`` the network: ``true``, or its keyword arguments, e.g. ``{mode: max-autotune}``.
            Under ``fsdp`` each block is compiled instead (FSDP's communication between blocks stays eager, and
            blocks of one class share one compiled graph). If compiling fails (no C++ compiler, no Triton, an
            operator it cannot lower), training goes on without it, with a warning that says why.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: Pretrained = False,
        pretrained_prefix: str | None = None,
        pretrained_strict: bool = False,
        freeze_backbone: bool = False,
        backbone_lr_scale: NonNegativeFloat = 1.0,
        num_classes: PositiveInt = 1000,
        class_names: list[str] | None = None,
        preprocess: dict[str, Any] | None = None,
        label_smoothing: ClosedUnitInterval = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        warmup_fraction: ClosedUnitInterval = 0.1,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        # Speed settings stay out of the checkpoint: loading it for inference should not compile anything.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "pretrained", "channels_last", "compile"])
        self.weights = resolve_weights(backbone, pretrained)
        self.channels_last = channels_last
        self.compile_options = {} if compile is True else compile
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.compiled_blocks: list[nn.Module] = []
        # Weights that change the network (ViT SWAG: 384-pixel position embeddings) are recorded with it, so the
        # checkpoint rebuilds the same network without them (imgcls.inference.predictor).
        self.hparams.backbone_kwargs = {**self.weights.arch_kwargs(), **(backbone_kwargs or {})}
        self.backbone_kwargs = self.hparams.backbone_kwargs
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.net: nn.Module | None = None  # built in configure_model, so sharding strategies can wrap it

        def metrics(stage: str) -> MetricCollection:
            top = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=IGNORE_INDEX)}
            if num_classes >= 5:
                top["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro", ignore_index=IGNORE_INDEX)
            return MetricCollection(top, prefix=f"{stage}/")

        # One metric object per stage: sharing one between validation and test would mix their counts.
        self.train_metrics, self.val_metrics, self.test_metrics = (metrics(s) for s in ("train", "val", "test"))
        # The mean loss of each stage's epoch, weighted by the images each batch really holds (no NaN check: it
        # would make the host wait for the device every step).
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "ImageClassifier":
        """Lightning's, once the file is known to describe a network that builds without loading or downloading
        anything (``imgcls.checkpoints.ModelSpec.refuse_loading``): it is built from the file's hyperparameters."""
        if isinstance(checkpoint_path, str | Path):
            ModelSpec.from_hparams(read_metadata(checkpoint_path).get("hyper_parameters") or {}, checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def configure_model(self) -> None:
        if self.net is None:
            hp = self.hparams
            build = functools.partial(
                create_backbone, hp.backbone, hp.num_classes, self.weights, prefix=hp.pretrained_prefix,
                strict=hp.pretrained_strict, report=rank_zero_info, **self.backbone_kwargs,
            )  # fmt: skip
            # Sharded: built on the meta device, then each process makes only its own shards (FSDP2Strategy.setup)
            sharded = self._trainer is not None and isinstance(self._trainer.strategy, FSDP2Strategy)
            self.net = build_deferred(build) if sharded else build()
            if hp.freeze_backbone:
                finetuning.freeze_backbone(self.net)
            if self.channels_last:
                self.net.to(memory_format=torch.channels_last)
            if self.compile_options is not False:
                # Sharded: each block, before FSDP2Strategy.setup wraps them. Else the forward function, not the
                # module: torch.compile(module) would add a wrapper module, and with it a second name for every
                # weight in the checkpoint. Compiling happens on the first call.
                self.compiled_blocks = compile_blocks(self.net, **self.compile_options) if sharded else []
                self.compiled = (
                    self.net if self.compiled_blocks else torch.compile(self.net.forward, **self.compile_options)
                )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.compiled is not None:
            try:
                return self.compiled(images)  # (B, num_classes) logits
            except Exception as error:  # whatever the compiler raises; the eager call below raises real errors again
                reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
                rank_zero_warn(f"--model.compile: torch.compile failed, training goes on without it: {reason}")
                self.compiled = None
                uncompile_blocks(self.compiled_blocks)
                self.compiled_blocks = []
        return self.net(images)  # (B, num_classes) logits

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        images, targets = batch
        logits = self(images)
        # targets: class indices (B,), or class probabilities (B, num_classes) from MixUp / CutMix
        smoothing = self.hparams.label_smoothing
        if stage == "train":
            count, loss = len(targets), F.cross_entropy(logits, targets, label_smoothing=smoothing)
            # The global batch's loss: reduced over the processes now, in the step every process runs.
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, sync_dist=True, prog_bar=True)
        else:  # on several devices evaluation carries padding labelled IGNORE_INDEX (imgcls.data.padding): skip it
            count = int((targets != IGNORE_INDEX).sum())
            loss = F.cross_entropy(logits, targets, label_smoothing=smoothing, reduction="sum") / max(count, 1)
        getattr(self, f"{stage}_metrics").update(logits, targets.argmax(dim=1) if targets.ndim == 2 else targets)
        getattr(self, f"{stage}_loss").update(loss.detach(), count)
        return {"loss": loss, "logits": logits.detach()}  # callbacks get them as `outputs` (imgcls.callbacks.figures)

    def _log_metrics(self, stage: str) -> None:
        # Once an epoch, not with each step: self.log calls cost Python time on every step (benchmarks/README.md).
        # compute() sums the counts of every process, here, in a hook every process runs (see imgcls.parallel.reduced).
        metrics, loss = getattr(self, f"{stage}_metrics"), getattr(self, f"{stage}_loss")
        log_reduced(self, {**metrics.compute(), f"{stage}/loss": loss.compute()}, prog_bar=True)
        metrics.reset()
        loss.reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        scale = self.hparams.backbone_lr_scale
        if scale == 1:
            optimizer = self.optimizer(self.parameters())
        else:
            backbone = finetuning.backbone_parameters(self.net)
            in_backbone = {id(p) for p in backbone}
            head = [p for p in self.parameters() if id(p) not in in_backbone]
            optimizer = self.optimizer([{"params": backbone, "name": "backbone"}, {"params": head, "name": "head"}])
            optimizer.param_groups[0]["lr"] *= scale  # before the scheduler records each group's initial_lr
        if self.lr_scheduler is not None:
            scheduler = {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch", "monitor": MONITOR}
        else:
            total = self.trainer.estimated_stepping_batches
            warmup = max(1, round(self.hparams.warmup_fraction * total)) if math.isfinite(total) else 1

            def warmup_cosine(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                if not math.isfinite(total):
                    return 1.0
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

            scheduler = {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": {**scheduler, "name": "lr"}}
