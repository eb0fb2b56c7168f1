"""GPU-only checks with timings: mixed precisions, and FSDP + CPU offload + activation checkpointing training a
model whose parameters, gradients and Adam states exceed the GPU's memory. Prints one table row per run. First,
that normalising a batch on the GPU does not wait for the GPU's queued work."""

import math
import os
import time
from pathlib import Path

import torch
import torchvision

from imgcls.cli import main
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch
from imgcls.model import ImageClassifier
from imgcls.parallel.deferred_init import build_deferred

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"  # as train.py passes it

QUICK = [
    "--trainer.enable_progress_bar=false",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--checkpoint.save_last=false",
    "--checkpoint.save_top_k=0",  # no files: the wide ViT's would be tens of GB
]


class WideViT(ImageClassifier):
    """A ViT whose width and depth are set from the GPU's memory, for the too-large-for-one-GPU check."""

    layers = 1
    width = 4096

    def configure_model(self) -> None:
        if self.net is None:  # on the meta device; each process then makes its own shards only (FSDP2Strategy)
            self.net = build_deferred(
                lambda: torchvision.models.VisionTransformer(
                    image_size=self.hparams.preprocess["crop_size"],
                    patch_size=16,
                    num_layers=self.layers,
                    num_heads=32,
                    hidden_dim=self.width,
                    mlp_dim=4 * self.width,
                    num_classes=self.hparams.num_classes,
                )
            )


def check_normalize_batch_does_not_sync() -> None:
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    normalize_batch(images, IMAGENET_MEAN, IMAGENET_STD)  # the first call puts mean and std on the GPU
    torch.cuda.set_sync_debug_mode("error")  # raises on any host-device synchronisation
    try:
        normalize_batch(images, IMAGENET_MEAN, IMAGENET_STD)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("normalize_batch: no host-device synchronisation")


def timed(name: str, args: list[str], model_class: type[ImageClassifier] = ImageClassifier) -> None:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli = main([*QUICK, *args], model_class, config=DEFAULT_CONFIG)
    seconds = time.perf_counter() - start
    trainer = cli.trainer
    images = trainer.global_step * cli.datamodule.hparams.batch_size
    params = sum(p.numel() for p in cli.model.parameters())
    peak = torch.cuda.max_memory_allocated() / 2**30
    acc = float(trainer.callback_metrics.get("test/acc", float("nan")))
    print(f"| {name} | {params / 1e6:,.0f} M | {images / seconds:,.0f} | {peak:.1f} | {acc:.3f} |", flush=True)


if __name__ == "__main__":
    check_normalize_batch_does_not_sync()
    gpu = torch.cuda.get_device_properties(0)
    print(f"\n{gpu.name}, {gpu.total_memory / 2**30:.0f} GiB\n")
    print("| run | params | images/s (incl. startup) | peak GPU GiB | test acc |\n|---|---|---|---|---|", flush=True)
    resnet50 = [
        "--model.backbone=resnet50",
        "--data.crop_size=224",
        "--data.resize_size=224",
        "--data.batch_size=128",
        "--trainer.max_epochs=2",
        f"--data.num_workers={min(8, os.cpu_count())}",
    ]
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        timed(f"resnet50 {precision}", [*resnet50, f"--trainer.precision={precision}"])
    timed(
        "resnet50 bf16-mixed fsdp, sharded checkpoints (1 GPU)",
        [*resnet50, "--trainer.precision=bf16-mixed", "--config=configs/fsdp.yaml"],
    )
    timed(
        "resnet50 16-mixed fsdp config, compiled per block (1 GPU)",
        [*resnet50, "--trainer.precision=16-mixed", "--config=configs/fsdp.yaml", "--model.compile=true"],
    )

    # 16 bytes per parameter (fp32 weights, gradients, two Adam moments); 12 d^2 parameters per ViT layer.
    WideViT.layers = math.ceil(1.1 * gpu.total_memory / 16 / (12 * WideViT.width**2))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = 16 * 12 * WideViT.width**2 * WideViT.layers * 1.2
    if need > host:
        print(
            f"\nskipped the offload check: it needs ~{need / 2**30:.0f} GiB of host memory, this host has "
            f"{host / 2**30:.0f} GiB"
        )
    else:
        timed(
            f"ViT {WideViT.layers}x{WideViT.width} fsdp offload+checkpointing",
            [
                "--config=configs/fsdp.yaml",
                "--config=configs/fsdp_offload.yaml",
                "--config=configs/fsdp_checkpointing.yaml",
                "--trainer.precision=bf16-mixed",
                "--data.crop_size=224",
                "--data.resize_size=224",
                "--data.batch_size=8",
                "--trainer.max_steps=3",
                "--trainer.limit_val_batches=1",
                "--trainer.limit_test_batches=1",
                "--data.num_workers=4",
            ],
            WideViT,
        )
