"""What the model gets right and wrong, as TensorBoard images: a confusion matrix and labelled sample predictions."""

import itertools
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure  # imported with the callback, before imgcls.cli freezes the heap for training
from torchmetrics.classification import MulticlassConfusionMatrix

from imgcls.callbacks.tensorboard import tensorboard
from imgcls.data.padding import IGNORE_INDEX
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD

Sample = tuple[torch.Tensor, int, int]  # (image (3, H, W) as the model saw it, predicted label, true label)
MAX_TEXT_CLASSES = 30  # above this, counts written in the cells become unreadable and slow to draw


class PredictionFigures(Callback):
    """After every ``every_n_epochs``-th validation epoch, and after testing, log to TensorBoard:

    - ``{stage}/confusion_matrix``: counts of true (rows) against predicted (columns) classes over every image of
      the stage, from torchmetrics, summed over all processes.
    - ``{stage}/samples``: ``num_samples`` images labelled predicted/true, misclassified ones first (red), as many
      of each true class as fit (evaluation data is ordered by class, so its first batches hold one class), from
      the first process.

    Works with ``ImageClassifier``: reads ``num_classes``, ``class_names`` and ``preprocess`` (to undo the
    normalisation) from its hyperparameters, and the logits its ``validation_step``/``test_step`` return.

    Drawing the two takes matplotlib 0.3 s or more on a CPU core, as long as a few training steps: drawn after every
    validation epoch, they cost the default 5-epoch run about 5 % of its time. That run draws only the test's (of
    the best checkpoint); longer runs also show how validation got there.

    Args:
        confusion_matrix: Log the confusion matrix.
        num_samples: Images in the sample grid; 0 turns it off.
        every_n_epochs: Draw the validation figures after every n-th epoch; 1 draws after each.
    """

    def __init__(self, confusion_matrix: bool = True, num_samples: int = 16, every_n_epochs: int = 10) -> None:
        self.confusion_matrix = confusion_matrix
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._matrix = MulticlassConfusionMatrix(pl_module.hparams.num_classes)
        self._class_names = pl_module.hparams.class_names or [str(i) for i in range(pl_module.hparams.num_classes)]
        preprocess = pl_module.hparams.preprocess or {}
        self._mean = torch.tensor(preprocess.get("mean", IMAGENET_MEAN)).view(3, 1, 1)
        self._std = torch.tensor(preprocess.get("std", IMAGENET_STD)).view(3, 1, 1)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._update(trainer, outputs["logits"], *batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(trainer, outputs["logits"], *batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, "test")

    def _start(self, pl_module: L.LightningModule) -> None:
        self._matrix = self._matrix.to(pl_module.device)
        self._matrix.reset()
        self._kept: dict[int, tuple[list[Sample], list[Sample]]] = {}  # true class -> (misclassified, right)

    def _update(self, trainer: L.Trainer, logits: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> None:
        real = targets != IGNORE_INDEX  # drop the padding that evenly split evaluation on several devices
        logits, images, targets = logits[real], images[real], targets[real]
        if self.confusion_matrix:
            self._matrix.update(logits, targets)
        if not trainer.is_global_zero:
            return
        predicted = logits.argmax(dim=1)
        wrong = predicted != targets
        per_class = math.ceil(self.num_samples / len(self._class_names))  # of each kind: a few images in memory
        for true in targets.unique().tolist():
            if true not in self._kept and len(self._kept) >= self.num_samples:
                continue  # more classes than samples: the first num_samples classes seen
            kept = self._kept.setdefault(true, ([], []))
            for mask, samples in zip((wrong, ~wrong), kept, strict=True):
                if len(samples) >= per_class:
                    continue  # full: most batches after the first few end here, without tensor work
                chosen = (mask & (targets == true)).nonzero().flatten()[: per_class - len(samples)]
                samples.extend((images[i].float().cpu(), predicted[i].item(), true) for i in chosen.tolist())

    def _draw(self, trainer: L.Trainer, stage: str) -> None:
        matrix = self._matrix.compute() if self.confusion_matrix else None  # collective: every process calls it
        writer = tensorboard(trainer)
        if writer is None:
            return
        if matrix is not None:
            writer.add_figure(f"{stage}/confusion_matrix", self._confusion_figure(matrix), trainer.global_step)
        samples = self._chosen()
        if samples:
            writer.add_figure(f"{stage}/samples", self._samples_figure(samples), trainer.global_step)

    def _chosen(self) -> list[Sample]:
        """Misclassified samples first, then right ones; within each, one of every class in turn."""
        ordered = []
        for kind in (0, 1):
            by_class = [kept[kind] for _, kept in sorted(self._kept.items())]
            ordered += [sample for turn in itertools.zip_longest(*by_class) for sample in turn if sample is not None]
        return ordered[: self.num_samples]

    def _confusion_figure(self, matrix: torch.Tensor) -> Figure:
        n = len(self._class_names)
        side = min(4 + 0.5 * n, 24)
        figure = Figure(figsize=(side, side), layout="constrained")
        self._matrix.plot(matrix, ax=figure.add_subplot(), add_text=n <= MAX_TEXT_CLASSES, labels=self._class_names)
        return figure

    def _samples_figure(self, samples: list[Sample]) -> Figure:
        columns = math.ceil(math.sqrt(len(samples)))
        rows = math.ceil(len(samples) / columns)
        figure = Figure(figsize=(1.8 * columns, 2.0 * rows))  # spaced by hand: a layout engine doubles the cost
        figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.45 / rows, wspace=0.1, hspace=0.35)
        figure.suptitle("predicted / true, misclassified first")
        axes = figure.subplots(rows, columns, squeeze=False).flatten()
        for ax in axes:
            ax.axis("off")
        for ax, (image, predicted, true) in zip(axes, samples, strict=False):
            pixels = (image * self._std + self._mean).clamp(0, 1).permute(1, 2, 0)  # (H, W, 3), as loaded
            ax.imshow(pixels.numpy(), interpolation="nearest")
            names = self._class_names
            ax.set_title(f"{names[predicted]} / {names[true]}", color="green" if predicted == true else "red")
        return figure
