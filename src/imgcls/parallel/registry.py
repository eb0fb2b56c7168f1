"""The ``--trainer.strategy`` names of this project's strategies; ``register_strategies()`` registers them.

Each shards block by block instead of treating the whole network as one unit (Lightning's default, which gathers
every parameter at once).
"""

from lightning.pytorch.strategies import StrategyRegistry

from imgcls.parallel.fsdp1 import FSDP1Strategy
from imgcls.parallel.fsdp2 import FSDP2Strategy


def register_strategies() -> None:
    """Make ``--trainer.strategy`` names resolve to the block-wise strategies."""
    StrategyRegistry.register("fsdp", FSDP1Strategy, "FSDP, one unit per backbone block", override=True)
    StrategyRegistry.register(
        "fsdp_cpu_offload", FSDP1Strategy, "FSDP per block, with CPU offload", override=True, cpu_offload=True
    )
    StrategyRegistry.register("fsdp2", FSDP2Strategy, "FSDP2 (fully_shard), one unit per backbone block", override=True)
    # The names --plan recommends and --trainer.strategy=auto_fit picks (imgcls.planner)
    variants = {
        "checkpointing": {"checkpoint_blocks": True},
        "cpu_offload": {"cpu_offload": True},
        "cpu_offload_checkpointing": {"cpu_offload": True, "checkpoint_blocks": True},
    }
    for name, options in variants.items():
        description = f"FSDP2 per block, {name.replace('_', ' ')}"
        StrategyRegistry.register(f"fsdp2_{name}", FSDP2Strategy, description, override=True, **options)
