"""A process's part of a tensor that several processes hold between them (DDP's copies, FSDP2's shards, tensor
parallelism's splits), and the weight that makes per-process sums add up to the whole tensor's.

Each value of a whole tensor lives on ``world size / pieces`` processes, where ``pieces`` is how many parts it is cut
into. Weighting each process's sums by ``pieces / world size`` counts every value once when they are summed over all
processes: one all-reduce, whatever device meshes the tensors live on.
"""

import math

from torch import Tensor
from torch.distributed.tensor import DTensor


def pieces(tensor: Tensor) -> int:
    """Into how many parts the processes cut ``tensor``: 1 for a plain (replicated) tensor, the sizes of the mesh
    dimensions that split a ``DTensor``."""
    if not isinstance(tensor, DTensor):
        return 1
    # Every placement but Replicate and Partial splits: Shard, and the _StridedShard of FSDP2 over tensor
    # parallelism, whose is_shard() is False
    splits = [
        dim
        for dim, placement in enumerate(tensor.placements)
        if not (placement.is_replicate() or placement.is_partial())
    ]
    return math.prod(tensor.device_mesh.size(dim) for dim in splits)


def local_part(tensor: Tensor, world_size: int) -> tuple[Tensor, float]:
    """This process's part of ``tensor`` (in place: a view of its storage) and the weight of its sums."""
    part = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return part, pieces(tensor) / world_size
