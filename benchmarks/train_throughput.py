"""Training images/s: the template (LightningCLI, Trainer, its callbacks and metrics) against a hand-written loop.

    python benchmarks/train_throughput.py                     # resnet18 on the embedded digits, on the CPU
    python benchmarks/train_throughput.py --root data/bench_jpegs --backbone resnet50 --crop_size 224 \\
        --precision bf16-mixed --channels_last --compile --accelerator cuda --batch_size 128   # on a GPU

Both sides get the same backbone, images, preprocessing, batch size, precision, loader workers and AdamW. The
template runs as `python train.py` does, with the default config's callbacks, metrics and logging, and
normalises each batch on the device. The loop is what one writes by hand: torchvision's ImageFolder and model
(normalising each image in the loader processes), autocast, a warmup-cosine schedule, the loss printed every
10 steps. Both live in one process and take turns epoch by epoch: after each training epoch of
the template (timed from its start to its last step, validation excluded), one epoch of the loop. Turns this
short put both sides under the same load, which on a shared machine changes from minute to minute. Sharing the
process, the loop also gets what the template sets for the whole process, such as the allocator setting of
`--keep_freed_memory` (imgcls.runtime): the ratio compares per-step code, not process settings. The first
pair warms up and is not counted. Prints each pair, the medians and the median of the pairs' ratios
template/loop. The goal is at least 0.98.
"""

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, v2

from imgcls.cli import main as train
from imgcls.data.digits import DIGITS_ROOT, write_digits
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"  # as train.py passes it

GOAL = 0.98  # the template's images/s over the loop's
LOG_EVERY = 10  # steps between logged losses, on both sides (the default config's log_every_n_steps)


class HandWrittenLoop:
    """What one writes by hand: torchvision's ImageFolder and model, AdamW, autocast, a warmup-cosine schedule."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.device = args, torch.device("cuda" if args.accelerator == "cuda" else "cpu")
        preprocess = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(args.crop_size, interpolation=InterpolationMode.BILINEAR),
                v2.CenterCrop(args.crop_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        train_dir = root / "train" if (root / "train").is_dir() else root
        images = torchvision.datasets.ImageFolder(str(train_dir), preprocess)
        self.loader = DataLoader(
            images, args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=args.workers > 0,
        )  # fmt: skip
        net = torchvision.models.get_model(args.backbone, num_classes=len(images.classes)).to(self.device)
        self.net = net.to(memory_format=torch.channels_last) if args.channels_last else net
        self.model = torch.compile(self.net) if args.compile else self.net
        self.optimizer = torch.optim.AdamW(self.net.parameters())
        steps = args.epochs * min(args.batches, len(self.loader))
        warmup = max(1, steps // 10)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * step / steps)),
        )
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.step = 0

    def epoch(self) -> float:
        """Train one epoch; return its images/s."""
        start, seen = _now(self.device), 0
        for batch_idx, (x, y) in enumerate(self.loader):
            if batch_idx == self.args.batches:
                break
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.schedule.step()
            self.step, seen = self.step + 1, seen + len(x)
            if self.step % LOG_EVERY == 0:
                print(f"step {self.step} loss {loss.item():.4f}", file=sys.stderr)
        return seen / (_now(self.device) - start)


LOOP: HandWrittenLoop | None = None  # the loop TakeTurns runs; set before train.py builds the callback


class TakeTurns(L.Callback):
    """Time each training epoch of the template, then run one epoch of ``LOOP``: (template, loop) images/s."""

    def __init__(self) -> None:
        self.pairs: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.images = _now(pl_module.device), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.images += trainer.datamodule.hparams.batch_size
        self.last = _now(pl_module.device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pairs.append((self.images / (self.last - self.start), LOOP.epoch()))


def take_turns(args: argparse.Namespace, root: Path) -> list[tuple[float, float]]:
    """Run ``python train.py`` with these settings, one epoch of the hand-written loop after each of its epochs."""
    global LOOP
    LOOP = HandWrittenLoop(args, root)
    flags = [
        f"--data.root={root}", f"--model.backbone={args.backbone}", f"--data.batch_size={args.batch_size}",
        f"--data.crop_size={args.crop_size}", f"--data.resize_size={args.crop_size}", "--data.augment=none",
        f"--data.num_workers={args.workers}",
        f"--trainer.precision={args.precision}", f"--trainer.accelerator={args.accelerator}", "--trainer.devices=1",
        f"--trainer.max_epochs={args.epochs}", f"--trainer.limit_train_batches={args.batches}",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false",
        f"--model.channels_last={args.channels_last}", f"--model.compile={args.compile}",
        "--trainer.callbacks+=__main__.TakeTurns",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, _quietly_in(tmp):
        cli = train(flags, config=DEFAULT_CONFIG)
    return next(callback for callback in cli.trainer.callbacks if isinstance(callback, TakeTurns)).pairs


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA runs ahead of Python: wait for the queued work
    return time.perf_counter()


@contextlib.contextmanager
def _quietly_in(folder: str) -> Iterator[None]:
    """Run inside ``folder``, with train.py's own printing sent to stderr, away from the results."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os.chdir(old)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageFolder tree (default: the embedded digits)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--crop_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--precision", default="32-true", choices=["32-true", "16-mixed", "bf16-mixed"])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network on both sides")
    parser.add_argument("--epochs", type=int, default=11, help="epochs of each side; the first pair is not counted")
    parser.add_argument("--batches", type=int, default=20, help="training batches per epoch at most (default: 20)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first pair is not counted")
    root = (args.root or write_digits(DIGITS_ROOT)).resolve()  # train.py runs in a folder of its own
    pairs = take_turns(args, root)[1:]
    setting = f"{args.backbone} {args.crop_size} px, batch {args.batch_size}, {args.precision}, {args.accelerator}"
    print(f"training throughput, {setting}, {args.workers} loader workers: {len(pairs)} epochs of each, taking turns")
    print(f"  {'epoch':>5} {'template':>9} {'loop':>9} {'ratio':>6}")
    for index, (template, loop) in enumerate(pairs, 2):
        print(f"  {index:>5} {template:9.1f} {loop:9.1f} {template / loop:6.3f}")
    template, loop = (statistics.median(side) for side in zip(*pairs, strict=True))
    ratio = statistics.median(template / loop for template, loop in pairs)
    print(f"  {'median':>5} {template:9.1f} {loop:9.1f} {ratio:6.3f}   ratio template/loop, goal: >= {GOAL}")


if __name__ == "__main__":
    main()
