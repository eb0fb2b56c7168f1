"""The memory planner against a GPU: ``train.py --plan``'s peak next to ``torch.cuda.max_memory_allocated`` of the
same command's second training step (the first steady-state one), one Markdown row per configuration.

    python benchmarks/plan_accuracy.py          # on a machine with a CUDA GPU; paste the table into RESULTS.md

The plan counts tensors only; ``max_memory_allocated`` counts the caching allocator's blocks (rounded up to 512
bytes), also cuDNN/cuBLAS workspaces that PyTorch allocates through it, but not the CUDA context or fragmentation.
"""

import sys
from pathlib import Path

import lightning as L
import torch

from imgcls.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"  # as train.py passes it

STEPS = [
    "--trainer.accelerator=gpu",
    "--trainer.devices=1",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=0",
    "--trainer.limit_test_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--trainer.callbacks=[]",
    "--checkpoint.save_top_k=0",
    "--checkpoint.save_last=false",
    "--data.num_workers=4",
]
# backbone, image size, batch per GPU, precision, strategy
CONFIGS = [
    ("resnet18", 224, 64, "32-true", "auto"),
    ("resnet50", 224, 64, "32-true", "auto"),
    ("resnet50", 224, 128, "bf16-mixed", "auto"),
    ("resnet50", 224, 128, "bf16-mixed", "fsdp_checkpointing"),
    ("vit_b_16", 224, 32, "32-true", "auto"),
    ("vit_b_16", 224, 64, "bf16-mixed", "auto"),
    ("vit_l_16", 224, 32, "bf16-mixed", "auto"),
    ("vit_l_16", 224, 32, "bf16-mixed", "fsdp_checkpointing"),
    ("vit_h_14", 224, 8, "bf16-true", "auto"),
]


class StepPeak(L.Callback):
    """``torch.cuda.max_memory_allocated`` during the second training step."""

    peak = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int) -> None:
        if i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, i: int
    ) -> None:
        if i == 1:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def row(backbone: str, size: int, batch: int, precision: str, strategy: str) -> str:
    args = [
        *STEPS,
        f"--model.backbone={backbone}",
        f"--data.crop_size={size}",
        f"--data.resize_size={size}",
        f"--data.batch_size={batch}",
        f"--trainer.precision={precision}",
        f"--trainer.strategy={strategy}",
    ]
    planned = main([*args, "--plan"], config=DEFAULT_CONFIG).plan.configured.peak
    cli = main([*args, "--trainer.callbacks+=plan_accuracy.StepPeak"], config=DEFAULT_CONFIG)
    real = next(c.peak for c in cli.trainer.callbacks if type(c).__name__ == "StepPeak")
    if torch.distributed.is_initialized():  # fsdp2 leaves its process group; the next plan makes a fake one
        torch.distributed.destroy_process_group()
    torch.cuda.empty_cache()
    gib, error = 2**30, planned / real - 1
    config = f"| {backbone} | {size} | {batch} | {precision} | {strategy} |"
    return f"{config} {planned / gib:.2f} | {real / gib:.2f} | {error:+.1%} |"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU; on a CPU, tests/test_plan_accuracy.py compares with real CPU runs")
    gpu = torch.cuda.get_device_properties(0)
    print(f"\n{gpu.name}, {gpu.total_memory / 2**30:.0f} GiB, torch {torch.__version__}\n")
    print("| backbone | px | batch | precision | strategy | planned GiB | max_memory_allocated GiB | error |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for config in CONFIGS:
        print(row(*config), flush=True)
