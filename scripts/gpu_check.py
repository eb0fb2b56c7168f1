"""GPU-only checks with timings: mixed precisions, FSDP + CPU offload + activation checkpointing training a model
whose parameters, gradients and Adam states exceed the GPU's memory, and tensor parallelism (fsdp_tp): on one GPU
the split attention's own cost against fsdp, on two or more GPUs fsdp_tp against fsdp. Prints one table row per run.
First, that normalising a batch on the GPU does not wait for the GPU's queued work."""

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from imgcls.cli import main
from imgcls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch
from imgcls.model import ImageClassifier
from imgcls.parallel.deferred_init import build_deferred

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"  # as train.py passes it

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


def timed_processes(name: str, args: list[str]) -> None:
    """``timed`` for a run of several processes: train.py started as a user starts it (Lightning's launcher reruns
    the script it is in, which must be train.py), its images/s and peak memory read from its TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as workdir:
        done = subprocess.run([sys.executable, str(REPO / "train.py"), *QUICK, *args], cwd=workdir, check=False)
        if done.returncode:
            print(f"| {name} | failed with exit status {done.returncode} | | | |", flush=True)
            return
        events = EventAccumulator(str(Path(workdir) / "logs" / "version_0"))
        events.Reload()
        last = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    speed, peak = last.get("perf/train_images_per_s", math.nan), last.get("perf/cuda_peak_mib", math.nan) / 1024
    acc = last.get("test/acc", math.nan)
    print(f"| {name} | | {speed:,.0f} (last epoch, training only) | {peak:.1f} | {acc:.3f} |", flush=True)


def tensor_parallel_runs(gpus: int) -> None:
    """vit_l_16 at 224 pixels in bf16: fsdp against fsdp_tp, on one GPU (tensor_parallel_size 1: the split
    attention's cost) and, with two or more, on two GPUs (each block split over both)."""
    workers = f"--data.num_workers={min(8, os.cpu_count())}"
    vit = ["--model.backbone=vit_l_16", "--data.crop_size=224", "--data.resize_size=224", "--data.batch_size=64",
           "--trainer.precision=bf16-mixed", "--trainer.max_epochs=2", workers]  # fmt: skip
    timed("vit_l_16 bf16-mixed fsdp (1 GPU)", [*vit, "--trainer.strategy=fsdp"])
    timed(
        "vit_l_16 bf16-mixed, split attention, tensor_parallel_size 1 (1 GPU)",
        [*vit, "--trainer.strategy=imgcls.parallel.tensor_parallel.TensorParallelStrategy",
         "--trainer.strategy.tensor_parallel_size=1"],
    )  # fmt: skip
    if gpus < 2:
        print("\nskipped fsdp_tp on 2 GPUs: this machine has one")
        return
    for strategy, batch in (("fsdp", 32), ("fsdp_tp", 64)):  # the same global batch: fsdp_tp's 2 GPUs share theirs
        timed_processes(
            f"vit_l_16 bf16-mixed {strategy}, 2 GPUs, global batch 64",
            [*vit, "--trainer.devices=2", f"--trainer.strategy={strategy}", f"--data.batch_size={batch}"],
        )


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

    tensor_parallel_runs(torch.cuda.device_count())

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
