"""Reading checkpoints safely: any device's checkpoint onto the CPU, tensors and plain data only."""

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from imgcls.errors import UserError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU with ``weights_only=True``; user mistakes raise ``UserError``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:  # the pickle asks for a callable: the classic code-execution payload, or a foreign class
            raise UserError(f"{path}: refused, it asks to import {found[1]}; only tensors and plain data load") from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint") from None
    except Exception as error:  # torch.load fails on corrupt files with many exception types
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None

def latest_checkpoint(logs: str | Path = "logs", name: str = "best.ckpt") -> Path:
    """Return the most recently written ``name`` under ``logs``."""
    found = sorted(Path(logs).glob(f"**/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no {name} under {Path(logs).resolve()}; train first (python train.py) or pass --checkpoint")
    return found[-1]
