"""A tiny classifier fitted with the ParameterInspector, in one process or, as a script, in two CPU processes.

    python tests/tiny_inspected.py LOG_DIR ddp|fsdp2

Every process fits the same seeded model on the same 64 points; the global batch is 32 whatever the number of
processes, so the gradients, norms and histograms of a run must equal those of the one-process run.
"""

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from imgcls.callbacks.inspection import ParameterInspector

GLOBAL_BATCH = 32


class Tiny(L.LightningModule):
    """Two linear layers (15 rows by default: unequal shards over 2 processes), optionally one cut off from the loss."""

    def __init__(self, hidden: int = 15, dead_layer: bool = False, loss_scale: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.dead = nn.Linear(8, 3) if dead_layer else None
        self.loss_scale = loss_scale

    def configure_model(self) -> None:
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        points, labels = batch
        logits = self.net(points)
        if self.dead is not None:
            logits = logits + self.dead(points).detach()  # the layer runs, but no gradient flows back to it
        return F.cross_entropy(logits, labels) * self.loss_scale

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator))
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, world, rank, shuffle=False)  # rank r: points r, r + world, ...
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def fit(log_dir: Path, strategy: str = "single", **model_args: float | bool) -> Tiny:
    """Fit ``Tiny`` for 2 steps, inspecting every step with histograms; ``strategy`` single, ddp or fsdp2."""
    L.seed_everything(0, verbose=False)
    model = Tiny(**model_args)
    devices = 1 if strategy == "single" else 2
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy={
            "single": "auto",
            "ddp": "ddp",
            "fsdp": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        }[strategy],
        max_steps=2,
        logger=TensorBoardLogger(log_dir, name="", version=""),
        callbacks=[ParameterInspector(every_n_steps=1, histograms=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # train_dataloader shares the points out in order
    )
    trainer.fit(model)
    return model


if __name__ == "__main__":
    fit(Path(sys.argv[1]), sys.argv[2])
    if torch.distributed.is_initialized():  # as imgcls.cli does: a rank that exits with its gloo group alive can
        torch.distributed.destroy_process_group()  # abort the other ("terminate called": connection closed by peer)
