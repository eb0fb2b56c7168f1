"""Networks that never exist whole in one process: built on the meta device, sharded, then each process fills only
its own shards, with the very values a normal build would give them.

While the network is built, every parameter and buffer moves to the meta device as it is registered, and every
in-place call on one (``nn.init.trunc_normal_``, ``zero_``, ``load_state_dict``'s ``copy_``) is recorded,
with the random generator's state before it. Each random operation also runs once on scratch memory of that one
tensor, so the generator advances exactly as in a normal build. After sharding, ``materialize`` replays each
tensor's operations on real memory, one tensor at a time, and keeps this process's shard: the weights equal a
normal build's with the same seed, bit for bit, while a process never holds more than its shards and one tensor.
A tensor copied whole from a file (pretrained weights) is sliced before it is read, so a memory-mapped file
is read only where this process's shards come from, and those pages are handed back once copied.
"""

import dataclasses
import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from imgcls.compat.torch import compute_local_shape_and_global_offset
from imgcls.parallel.file_pages import FilePages

# In-place functions (``nn.init``'s, tensor methods) that overwrite every value they are given without reading any:
# what came before them no longer matters.
OVERWRITES = {"copy_", "zero_", "fill_", "normal_", "uniform_", "constant_", "ones_", "zeros_", "eye_", "dirac_"}
OVERWRITES |= {f"{kind}_{law}_" for kind in ("kaiming", "xavier") for law in ("normal", "uniform")}
OVERWRITES |= {"trunc_normal_", "orthogonal_", "sparse_"}
# In-place functions that draw no random numbers (the others run once more on scratch memory, see below).
DETERMINISTIC = {"copy_", "zero_", "fill_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "__setitem__"}
DETERMINISTIC |= {"add_", "sub_", "mul_", "div_", "clamp_", "clamp_min_", "clamp_max_", "erfinv_", "neg_", "abs_"}
METADATA_ONLY = {"requires_grad_", "share_memory_", "retain_grad"}
RECIPES: "weakref.WeakKeyDictionary[nn.Module, Recipe]" = weakref.WeakKeyDictionary()


class Untraceable(Exception):
    """The build did something to a tensor that cannot be replayed on its shards."""


@dataclasses.dataclass
class _Op:
    func: Callable[..., Any]  # an nn.init function or an in-place tensor method
    view: tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, storage offset of the tensor it changed
    args: tuple[Any, ...]  # its other arguments: numbers, real tensors
    kwargs: dict[str, Any]
    generator: torch.Generator | None = None
    state: Tensor | None = None  # the generator's state before it ran


@dataclasses.dataclass
class _Tensor:
    meta: Tensor  # kept alive so that its storage's identity is not reused
    initial: Tensor | None  # the real tensor it was registered with, until something overwrites it
    ops: list[_Op] = dataclasses.field(default_factory=list)


class _Scratch:
    """One buffer for every tensor made in turn, so that memory freed between them is not left with the allocator
    (which keeps freed blocks of a few MB and reuses them badly: 1.5 GB for ViT-L/16's 1.2 GB of weights)."""

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def like(self, size: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        elements = 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else 0
        nbytes = elements * dtype.itemsize
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(0, dtype=torch.uint8)  # freed before the larger one is made
            self.buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self.buffer[:nbytes].view(dtype).as_strided(size, stride)


class Recipe(TorchFunctionMode):
    """Records what a build does to its parameters and buffers (used as a context manager around the build)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[int, _Tensor] = {}
        self.by_name: dict[str, _Tensor | _Derived] = {}
        self.scratch = _Scratch()

    def track(self, real: Tensor) -> Tensor:
        """A meta tensor standing in for ``real``, whose later changes are recorded."""
        meta = real.detach().to("meta")
        self.tensors[_key(meta)] = _Tensor(meta, real.detach())
        return meta

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if not args and "tensor" in kwargs:  # nn.init's functions hand their tensor over by keyword
            args = (kwargs.pop("tensor"),)
        name = getattr(func, "__name__", "")
        if name.endswith("_") and (not name.startswith("_") or name == "__setitem__") and name not in METADATA_ONLY:
            self.record(name, func, args, kwargs)
        return func(*args, **kwargs)

    def record(self, name: str, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
        """Note the in-place call ``func(*args, **kwargs)`` if it changes a tracked tensor (``args[0]``)."""
        entry = self.tensors.get(_key(args[0])) if args else None
        if entry is None:
            return
        target = args[0]
        if any(isinstance(a, Tensor) and a.is_meta for a in (*args[1:], *kwargs.values())):
            raise Untraceable(f"{name} reads another meta tensor")
        op = _Op(func, (tuple(target.shape), tuple(target.stride()), target.storage_offset()), args[1:], kwargs)
        if name not in DETERMINISTIC:  # advance the generator as this call on real memory would
            op.generator = kwargs.get("generator") or torch.default_generator
            op.state = op.generator.get_state()
            func(self.scratch.like(*op.view[:2], target.dtype), *op.args, **kwargs)
        if name in OVERWRITES and target.shape == entry.meta.shape and target.is_contiguous():
            entry.ops, entry.initial = [], None
        entry.ops.append(op)

    def fill(self, name: str, local: Tensor, shard: Callable[[Tensor], Tensor], pages: FilePages) -> None:
        """Copy into ``local`` its part (``shard``) of the tensor called ``name``, as the build left it."""
        entry, part = self.by_name[name], _whole
        if isinstance(entry, _Derived):  # a part of a tensor the build made (q of a fused qkv, ...)
            entry, part = entry.source, entry.part
        if len(entry.ops) == 1 and entry.ops[0].func.__name__ == "copy_" and entry.initial is None:
            source = entry.ops[0].args[0]  # copied whole (from a file): read only this process's part of it
            if source.shape == entry.meta.shape:
                local.copy_(shard(part(source)))
                pages.release(source)
                return
        full = self.scratch.like(tuple(entry.meta.shape), entry.meta.stride(), entry.meta.dtype)
        if entry.initial is not None:
            full.copy_(entry.initial)
        for op in entry.ops:
            if op.generator is not None:
                op.generator.set_state(op.state)
            op.func(full.as_strided(*op.view), *op.args, **op.kwargs)
        local.copy_(shard(part(full)))


@dataclasses.dataclass(frozen=True)
class _Derived:
    source: _Tensor
    part: Callable[[Tensor], Tensor]  # the source's full tensor -> this one's full tensor (a view)


def _whole(tensor: Tensor) -> Tensor:
    return tensor


def derive(net: nn.Module, parts: dict[str, tuple[str, Callable[[Tensor], Tensor]]]) -> bool:
    """Tell ``materialize`` that tensors of ``net`` were made after ``build_deferred`` built it, from the build's
    tensors: name -> (the build's tensor name, its full tensor -> this one's, a view). ``False`` if ``net`` was not
    built deferred (its tensors are real: copy them yourself)."""
    recipe = RECIPES.get(net)
    if recipe is None:
        return False
    for name, (source, part) in parts.items():
        entry = recipe.by_name[source]
        if isinstance(entry, _Derived):
            entry, part = entry.source, functools.partial(_compose, entry.part, part)
        recipe.by_name[name] = _Derived(entry, part)
    return True


def _compose(first: Callable[[Tensor], Tensor], then: Callable[[Tensor], Tensor], tensor: Tensor) -> Tensor:
    return then(first(tensor))


def build_deferred(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device, with a recipe for ``materialize``; a normal build if it cannot be recorded."""
    cpu_state = torch.get_rng_state()
    recipe = Recipe()
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    trunc_normal = nn.init._no_grad_trunc_normal_  # returns at once on meta tensors, and has no torch-function hook

    def recorded_trunc_normal(tensor: Tensor, *args: Any, generator: torch.Generator | None = None) -> Tensor:
        if _key(tensor) not in recipe.tensors:  # a real tensor (or an untracked meta one): as usual
            return trunc_normal(tensor, *args, generator=generator)
        recipe.record("trunc_normal_", trunc_normal, (tensor, *args), {"generator": generator})
        return tensor

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(recipe.track(param), param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module: nn.Module, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, None if tensor is None or tensor.is_meta else recipe.track(tensor), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    nn.init._no_grad_trunc_normal_ = recorded_trunc_normal
    try:
        with recipe, warnings.catch_warnings():
            # load_state_dict's copies into meta tensors are recorded, not lost, whatever it says
            warnings.filterwarnings("ignore", message=r"for \S+: copying from a non-meta parameter")
            net = build()
        named = [*net.named_parameters(remove_duplicate=False), *net.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            if _key(tensor) not in recipe.tensors:
                raise Untraceable(f"{name} was replaced in a way that cannot be recorded")
            recipe.by_name[name] = recipe.tensors[_key(tensor)]
    except Untraceable as reason:
        rank_zero_warn(f"the network is built whole in every process, then sharded ({reason})")
        _restore(register_parameter, register_buffer, trunc_normal)
        torch.set_rng_state(cpu_state)  # the same random numbers as if it had been built so the first time
        return build()
    finally:
        _restore(register_parameter, register_buffer, trunc_normal)
    RECIPES[net] = recipe
    return net


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give every network under ``module`` built by ``build_deferred`` real memory: this process's shards only."""
    for net, recipe in [(m, RECIPES.pop(m)) for m in module.modules() if m in RECIPES]:
        net.to_empty(device=device)  # FSDP2 allocates the shards of sharded parameters, the rest whole
        cpu_state, pages = torch.get_rng_state(), FilePages()
        with torch.no_grad():
            for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
                local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                recipe.fill(name, local, lambda full, t=tensor: _shard(full, t), pages)
        torch.set_rng_state(cpu_state)  # the replay leaves the generator where the build left it


def _restore(register_parameter: Callable, register_buffer: Callable, trunc_normal: Callable) -> None:
    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    nn.init._no_grad_trunc_normal_ = trunc_normal


def _shard(full: Tensor, tensor: Tensor) -> Tensor:
    """This process's part of ``full``, split as the ``DTensor`` ``tensor`` is: a block of it, as DTensor computes it
    (FSDP2 over tensor-parallel shards included, whose placements interleave), read without communicating."""
    if not isinstance(tensor, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(full.shape, tensor.device_mesh, tensor.placements)
    for dim, (size, start) in enumerate(zip(shape, offset, strict=True)):
        full = full.narrow(dim, start, size)
    return full


def _key(tensor: Any) -> int | None:
    """The identity of a meta tensor's storage, shared by its views and aliases (``.data``, ``.detach()``)."""
    return tensor.untyped_storage()._cdata if isinstance(tensor, Tensor) and tensor.is_meta else None
