"""train.py that also counts the training process's page faults in each step: run it exactly like train.py.

From the third training step on (the heap grows until then), each step's minor page faults (``ru_minflt``: pages
the OS mapped in, zeroed) go to ``page_faults.json`` in the working directory: ``{"per_step": [...]}``. A fresh
process, because how many faults glibc's defaults cause depends on what the process allocated before.
"""

import json
import resource
import sys
from pathlib import Path
from typing import Any

import lightning as L

from imgcls.cli import main

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"  # as train.py passes it

FIRST = 2  # the batch index of the first counted step


class PageFaults(L.Callback):
    def __init__(self) -> None:
        self.per_step: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= FIRST:
            self.per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Path("page_faults.json").write_text(json.dumps({"per_step": self.per_step}))


if __name__ == "__main__":
    sys.argv.append("--trainer.callbacks+=page_faults.PageFaults")
    main(config=DEFAULT_CONFIG)
