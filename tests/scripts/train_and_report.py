"""train.py plus a per-rank report, for the multi-process tests: run it exactly like train.py.

At the end of training each rank writes ``report_rank<R>.json`` in the working directory: the bytes of
parameters (in all and each one's), gradients and optimizer states it holds (local shards only), the sums of the
full weights (in the plain network's layout), the live model's top-1 class for every 27th test image, the count of
FSDP's all-gathers and reduce-scatters by the dtype they carried (the real collectives run; they are only counted on
the way), the number of graphs torch.compile made and of blocks still compiled, 16-mixed's loss scale, and the
timeouts of FSDP's process groups. ``OverflowOnRank1`` makes one process's gradients overflow in the first step.
"""

import collections
import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from imgcls.checkpoints import join_state
from imgcls.cli import main
from imgcls.data.transforms import normalize_batch

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"  # as train.py passes it


COLLECTIVES: collections.Counter[str] = collections.Counter()


def _counted(name: str, collective: Callable) -> Callable:
    def call(*args: object, **kwargs: object) -> object:
        tensor = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
        COLLECTIVES[f"{name} {str(getattr(tensor, 'dtype', '?')).removeprefix('torch.')}"] += 1
        return collective(*args, **kwargs)

    return call


# FSDP2's default communication calls these two (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py)
for _name in ("all_gather_single", "reduce_scatter_single"):
    setattr(dist, _name, _counted(_name, getattr(dist, _name)))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


class Report(L.Callback):
    grads = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        # Gradients exist only between backward and the optimizer's zero_grad: count them here.
        self.grads = _nbytes([p.grad for p in pl_module.parameters() if p.grad is not None])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        params = list(named.values())
        states = [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
        # full_tensor() is a collective under FSDP2: every rank calls it, then each compares its own copy. Tensor
        # parallelism's q, k and v are joined, so the weights compare with the plain network's
        full = join_state({name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in named.items()})
        test = trainer.datamodule.datasets["test"]
        pixels = torch.stack([test[i][0] for i in range(0, len(test), 27)])  # every 27th held-out image, uint8
        images = normalize_batch(pixels, trainer.datamodule.preprocess["mean"], trainer.datamodule.preprocess["std"])
        pl_module.eval()
        with torch.no_grad():
            top1 = pl_module(images).argmax(1).tolist()  # a collective under FSDP2: every rank runs it
        pl_module.train()
        dynamo = sys.modules.get("torch._dynamo.utils")  # imported once something is compiled
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed's loss scaler
        mesh = getattr(trainer.strategy, "shard_mesh", None)  # FSDP2Strategy's: (replicate, shard) when hybrid
        groups = [mesh.get_group(dim) for dim in range(mesh.ndim)] if mesh is not None else []
        report = {
            "top1": [pl_module.hparams.class_names[i] for i in top1],
            "params": _nbytes(params),
            "grads": self.grads,
            "optimizer": _nbytes(states),
            "weights": [t.detach().double().sum().item() for t in full.values()],
            "param_bytes": {name: _nbytes([p]) for name, p in named.items()},
            "collectives": dict(COLLECTIVES),
            "compiled_graphs": dynamo.counters["stats"]["unique_graphs"] if dynamo else 0,
            "compiled_blocks": len(pl_module.compiled_blocks),
            "loss_scale": scaler.get_scale() if scaler is not None else None,
            "group_timeouts_s": [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in groups],
        }
        with open(f"report_rank{trainer.global_rank}.json", "w") as file:
            json.dump(report, file)


class OverflowOnRank1(L.Callback):
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.global_rank == 1:
            grad = next(_local(p.grad) for p in pl_module.parameters() if p.grad is not None and _local(p.grad).numel())
            grad.view(-1)[0] = float("inf")  # in this process's shard only


if __name__ == "__main__":
    main([*sys.argv[1:], "--trainer.callbacks+=train_and_report.Report"], config=DEFAULT_CONFIG)
