"""The planner's options on the training command line (``--plan``, ``--plan.*``, ``--trainer.strategy=auto_fit``).

The only module of the planner that ``imgcls.cli`` imports before it is asked for a plan; delete the ``planner``
folder and these options go with it.
"""

import re

from imgcls.errors import UserError

AUTO_FIT = "auto_fit"
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlanOptions:
    """How ``--plan`` and ``auto_fit`` judge what fits.

    Args:
        enabled: Print the memory each strategy needs for this configuration and exit, without training or building
            the network (``--plan`` for short).
        device_memory: Memory of one device, e.g. ``80GiB`` or ``40GB``. Default: the GPU's here; without a GPU and
            with ``--trainer.accelerator`` ``cpu`` or ``auto``, this machine's RAM shared by its processes.
        headroom: Share of the device memory kept free for what the plan does not count: the CUDA context, kernel
            workspaces, allocator fragmentation.
    """

    def __init__(self, enabled: bool = False, device_memory: str | None = None, headroom: float = 0.1) -> None:
        self.enabled = enabled
        self.device_memory = device_memory
        self.headroom = headroom


def parse_size(text: str) -> int:
    """Bytes in ``80GiB``, ``40 GB``, ``81920MiB`` or ``1e9``; GB is 10**9 bytes, GiB 2**30."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if match is None or match.group(2) not in UNITS:
        raise UserError(f"--plan.device_memory {text}: give a size such as 80GiB, 40GB or 81920MiB")
    return int(float(match.group(1)) * UNITS[match.group(2)])
