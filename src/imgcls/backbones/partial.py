"""Partial weight loading: every tensor of a state dict or checkpoint that fits a network, and a report of the rest."""

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imgcls.checkpoints import join_state, load_checkpoint
from imgcls.errors import UserError

# What wrappers put in front of tensor names: Lightning's strategy wrapper, torch.compile, DDP / DataParallel,
# and the attribute a LightningModule keeps its network in (``net.`` is this project's ImageClassifier).
KNOWN_PREFIXES = ("_forward_module.", "_orig_mod.", "module.", "model.", "backbone.", "net.")
# Where checkpoints keep their weights: Lightning, torchvision's reference scripts, timm's train script (EMA last).
STATE_DICT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
SHOWN = 5  # names listed per kind of problem in a report


@dataclass
class LoadReport:
    """What a partial load took from its source, and what it left as initialised."""

    source: str
    total: int  # tensors in the network's state dict
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the network
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # name, file, here

    def __str__(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} of {self.total} tensors"]
        if self.mismatched:
            shapes = [f"{name} {list(theirs)} in the file, {list(ours)} here" for name, theirs, ours in self.mismatched]
            lines.append(f"  shape mismatch, kept as initialised: {_some(shapes)}")
        if self.missing:
            lines.append(f"  missing from the file, kept as initialised: {_some(self.missing)}")
        if self.unexpected:
            lines.append(f"  in the file but not in the model, ignored: {_some(self.unexpected)}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``.safetensors`` file, a state dict, or a checkpoint that holds one, safely."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"{path}: no such weights file")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as error:
            raise UserError(f"{path}: not a readable safetensors file ({error})") from error
    content = load_checkpoint(path, mmap=True)  # weights_only=True: a file that tries to run code is refused
    for key in STATE_DICT_KEYS:
        if isinstance(content.get(key), dict):
            content = content[key]
            break
    tensors = {name: value for name, value in content.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors; pass a state dict, a checkpoint or a .safetensors file")
    return tensors


def strip_prefixes(
    state_dict: dict[str, torch.Tensor], net: nn.Module, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` and the known wrapper prefixes from the names, except where ``net`` itself uses the name."""
    own = {name.split(".", 1)[0] for name in net.state_dict()}  # a timm model may really have a `model.` child
    wrappers = [p for p in KNOWN_PREFIXES if p[:-1] not in own]
    stripped = {}
    for name, tensor in state_dict.items():
        if prefix:
            name = name.removeprefix(prefix)
        while found := next((p for p in wrappers if name.startswith(p)), None):
            name = name.removeprefix(found)
        stripped[name] = tensor
    return stripped


def load_partial(
    net: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    prefix: str | None = None,
    strict: bool = False,
    head: Iterable[str] = (),
) -> LoadReport:
    """Copy into ``net`` every tensor of ``state_dict`` whose name and shape match; leave the rest as initialised.

    Args:
        net: The network to load into.
        state_dict: The tensors to take from, named as in ``net`` after prefix stripping.
        source: Names the source in the report and in errors.
        prefix: Stripped from the names first, e.g. ``encoder.`` (the known wrapper prefixes always are).
        strict: Raise ``UserError`` if any tensor outside ``head`` is missing, unexpected or shaped differently.
        head: Module names of the new head, which is expected not to fit when the number of classes changes.
    """
    theirs = join_state(strip_prefixes(state_dict, net, prefix))  # a tensor-parallel checkpoint's q, k, v joined
    ours = net.state_dict()
    report = LoadReport(source, len(ours))
    for name, tensor in ours.items():
        if name not in theirs:
            report.missing.append(name)
        elif theirs[name].shape != tensor.shape:
            report.mismatched.append((name, tuple(theirs[name].shape), tuple(tensor.shape)))
        else:
            report.loaded.append(name)
    report.unexpected = [name for name in theirs if name not in ours]
    if strict:
        problems = [
            name
            for name in report.missing + report.unexpected + [name for name, _, _ in report.mismatched]
            if not any(name == h or name.startswith(f"{h}.") for h in head)
        ]
        if problems:
            raise UserError(f"{source}: {len(problems)} tensors do not fit, and loading is strict: {_some(problems)}")
    net.load_state_dict({name: theirs[name] for name in report.loaded}, strict=False)
    return report


def _some(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
