"""The ``--trainer.strategy`` names of this project's strategies; ``register_strategies()`` registers them.

``fsdp`` and its variants are FSDP2 (``fully_shard``) on every device, GPU or CPU. Each shards block by block
instead of treating the whole network as one unit (Lightning's default, which gathers every parameter at once).
``fsdp_tp`` (``fsdp_tp4``, ``fsdp_tp8``) adds tensor parallelism inside each ViT block over 2 (4, 8) processes.
"""

import importlib.util
from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from imgcls.compat.lightning import release_fsdp1_names
from imgcls.errors import UserError
from imgcls.parallel.fsdp2 import FSDP2Strategy
from imgcls.parallel.tensor_parallel import TensorParallelStrategy

VARIANTS = {
    "fsdp": {},
    "fsdp_checkpointing": {"checkpoint_blocks": True},
    "fsdp_cpu_offload": {"cpu_offload": True},
    "fsdp_cpu_offload_checkpointing": {"cpu_offload": True, "checkpoint_blocks": True},
    "fsdp_hybrid": {"shard_group_size": "node"},
}
# Tensor parallelism over 2, 4 or 8 processes (one node's GPUs), FSDP2 across the rest
TENSOR_PARALLEL = {f"fsdp_tp{'' if size == 2 else size}": {"tensor_parallel_size": size} for size in (2, 4, 8)}
TENSOR_PARALLEL |= {
    f"{name}_checkpointing": {**options, "checkpoint_blocks": True} for name, options in TENSOR_PARALLEL.items()
}


def register_strategies() -> None:
    """Make ``--trainer.strategy`` names resolve to the block-wise strategies (replacing Lightning's FSDP1 ``fsdp``)."""
    for name, options in VARIANTS.items():
        extra = ", ".join(f"{key}={value}" for key, value in options.items())
        description = "FSDP2 (fully_shard), one unit per backbone block" + (f"; {extra}" if extra else "")
        StrategyRegistry.register(name, FSDP2Strategy, description, override=True, **options)
    for name, options in TENSOR_PARALLEL.items():
        description = f"tensor parallelism over {options['tensor_parallel_size']} processes x FSDP2 over the rest" + (
            ", activation checkpointing" if options.get("checkpoint_blocks") else ""
        )
        StrategyRegistry.register(name, TensorParallelStrategy, description, override=True, **options)
    release_fsdp1_names(VARIANTS)


def refuse_untested_strategy(strategy: Any) -> None:
    """Lightning's DeepSpeed strategies without DeepSpeed: name what covers the same ground here, not just pip."""
    if isinstance(strategy, str) and strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise UserError(
            f"--trainer.strategy {strategy}: DeepSpeed is not installed, and this template is not tested with it; "
            "its sharding is here as fsdp (ZeRO-3), fsdp_cpu_offload (ZeRO-Offload) and fsdp_hybrid, on CPUs too "
            "(README.md, Strategies); or pip install deepspeed for Lightning's DeepSpeedStrategy, untested here"
        )
