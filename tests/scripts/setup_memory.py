"""train.py up to the end of its setup, for the setup-memory test: run it exactly like train.py, plus the weights file.

    python tests/scripts/setup_memory.py WEIGHTS [train.py flags...]

When training would start, each rank writes ``setup_rank<R>.json`` in the working directory: its peak resident
memory so far (``VmHWM``), and whether the tensors its shards make up equal the weights file's, where the file has
the tensor at that shape. Then every process exits.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.distributed.tensor import DTensor

from imgcls.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"  # as train.py passes it


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


class SetupMemory(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = peak_rss()
        weights = torch.load(sys.argv[1], mmap=True, weights_only=True)
        compared = equal = 0
        for name, tensor in pl_module.net.state_dict().items():
            if name in weights and weights[name].shape == tensor.shape:
                # full_tensor() gathers the shards: a collective every rank runs, in the same order
                whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
                compared += 1
                equal += torch.equal(whole, weights[name])
        report = {"peak_rss": peak, "compared": compared, "equal": equal}
        Path(f"setup_rank{trainer.global_rank}.json").write_text(json.dumps(report))
        os._exit(0)  # the measurement is done; nothing is pending between the processes


if __name__ == "__main__":
    weights = sys.argv[1]
    main([*sys.argv[2:], f"--model.pretrained={weights}", "--trainer.callbacks+=setup_memory.SetupMemory"],
         config=DEFAULT_CONFIG)  # fmt: skip
