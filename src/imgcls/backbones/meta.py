"""Networks built without memory: every parameter and buffer on the meta device, for shapes and sizes only."""

from collections.abc import Callable

import torch
from torch import nn


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its parameters and buffers on the meta device: no memory, no initialisation.

    Each parameter moves to the meta device as its module registers it, before the module initialises it (as
    Hugging Face Accelerate's ``init_empty_weights``); unlike ``with torch.device("meta")``, other tensors stay real,
    so builders that compute sizes with tensors (torchvision's RegNet) work.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def to_meta_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.detach().to("meta"), param.requires_grad)
        register_parameter(module, name, param)

    def to_meta_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = to_meta_parameter, to_meta_buffer
    try:
        return build()
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
