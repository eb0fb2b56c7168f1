"""The private parts of PyTorch this project uses, in one table: the first place to look after an upgrade.

Each name is imported from its module on first use (PEP 562): the memory trackers import ``torch._inductor``, about a
second, which only ``--plan`` should pay.
"""

import importlib
from typing import Any

PRIVATE = {
    "checkpoint": "torch.distributed._composable",  # activation checkpointing of one module, in place
    "compute_local_shape_and_global_offset": "torch.distributed.tensor._utils",  # a DTensor shard's block
    "_load_state_dict_from_keys": "torch.distributed.checkpoint.state_dict_loader",  # DCP in one process
    "FakeStore": "torch._C._distributed_c10d",  # a process group of fake ranks, for the planner
    "MemTracker": "torch.distributed._tools.mem_tracker",
    "FSDPMemTracker": "torch.distributed._tools.fsdp2_mem_tracker",
    "fake_tensor": "torch._subclasses",  # FakeTensorMode and the errors of networks it cannot run
    "_is_avx512_bf16_supported": "torch.cpu",  # whether a CPU computes in bf16 natively
    "_is_amx_tile_supported": "torch.cpu",
}


def __getattr__(name: str) -> Any:
    if name not in PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(PRIVATE[name]), name)
