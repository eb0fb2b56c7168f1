"""Reading checkpoints safely: any device's checkpoint onto the CPU, tensors and plain data only; and the plain
layout of a tensor-parallel checkpoint's weights (``join_state``).

A checkpoint is a ``.ckpt`` file, or a directory of shards written by a sharded strategy (``fsdp`` and its
variants): ``.metadata``, one ``__<rank>_0.distcp`` per rank and Lightning's ``meta.pt``.
"""

import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imgcls.errors import UserError

LOGS = "logs"  # where train.py writes its runs, and where predict.py and export.py look for the newest
BEST = "best"  # the file name (without .ckpt) of the best checkpoint of a run
LAST = "last"  # and of its newest: Lightning's ModelCheckpoint.CHECKPOINT_NAME_LAST
# Builder arguments with which torchvision's or timm's builders read a file or download one: a file may not ask for
# them, as the network it describes is built from them (predict.py, export.py, load_from_checkpoint).
LOADING_KWARGS = frozenset({"weights", "weights_backbone", "progress", "pretrained", "pretrained_cfg",
                            "pretrained_cfg_overlay", "pretrained_strict", "checkpoint_path", "cache_dir"})  # fmt: skip
PLAIN = (bool, int, float, str, type(None))
# Tensor parallelism keeps each attention's q, k and v apart (imgcls.parallel.tp_attention), as the row blocks of the
# plain network's fused tensor: its name -> the names of its parts ({} is q, k or v). Read, they are joined again.
QKV_PARTS = ("q", "k", "v")
FUSED = {"in_proj_weight": "in_proj.{}.weight", "in_proj_bias": "in_proj.{}.bias", "qkv.weight": "qkv.{}.weight",
         "qkv.bias": "qkv.{}.bias"}  # fmt: skip
_FUSED_FROM = {parts: fused for fused, parts in FUSED.items()}
_SPLIT = re.compile(r"^(?P<path>.*?)(?P<container>in_proj|qkv)\.(?P<part>[qkv])\.(?P<kind>weight|bias)$")


@dataclass(frozen=True)
class ModelSpec:
    """What a checkpoint says about its network besides the weights: the architecture, the classes, the
    preprocessing. The one reading of an ``ImageClassifier``'s hyperparameters, for inference, resume and export."""

    arch: str  # as --model.backbone names it: a torchvision name, or timm/<name>
    class_names: list[str]
    preprocess: dict[str, Any]  # imgcls.data.transforms.build_transforms's keyword arguments
    arch_kwargs: dict[str, Any] = field(default_factory=dict)  # for the builder, e.g. a ViT's image_size

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], source: object, trusted: bool = False) -> "ModelSpec":
        """Read ``hparams``; a ``UserError`` naming ``source`` if they are not an ImageClassifier's, or, unless
        ``trusted`` (this run's own), if building their network would read a file or connect anywhere."""
        names, kwargs = hparams.get("class_names"), hparams.get("backbone_kwargs") or {}
        if not isinstance(names, list | tuple) or not names or not all(isinstance(name, str) for name in names):
            raise UserError(
                f"{source}: its class_names are {names!r}, not a list of class names (one string per class)"
            )
        if not isinstance(hparams.get("backbone"), str) or not isinstance(kwargs, Mapping):
            raise UserError(f"{source}: not a checkpoint of this project's ImageClassifier (no backbone)")
        if not isinstance(hparams.get("preprocess"), Mapping):
            raise UserError(f"{source}: not a checkpoint of this project's ImageClassifier (no preprocess)")
        spec = cls(hparams["backbone"], list(names), dict(hparams["preprocess"]), dict(kwargs))
        if not trusted:
            spec.refuse_loading(source)
        return spec

    def refuse_loading(self, source: object) -> None:
        """Refuse a network whose building would read a file or download one: a model on a hub (``timm/hf-hub:``),
        builder arguments that load weights, or values that are not plain data."""
        fix = "only an architecture and plain builder arguments load from a file"
        if ":" in self.arch:
            raise UserError(f"{source}: refused, its backbone {self.arch} would be fetched from a hub; {fix}")
        loading = sorted(LOADING_KWARGS & set(self.arch_kwargs))
        if loading:
            named = ", ".join(map(repr, loading))
            raise UserError(f"{source}: refused, builder arguments {named} would make the builder load weights; {fix}")
        for key, value in self.arch_kwargs.items():
            if not isinstance(key, str) or not _plain(value):
                raise UserError(f"{source}: refused, its builder argument {key!r} is {value!r}; {fix}")

    @property
    def architecture(self) -> str:
        """``resnet18`` or ``vit_b_16(image_size=384)``: the backbone and the builder arguments that shape it."""
        kwargs = ", ".join(f"{key}={value}" for key, value in sorted(self.arch_kwargs.items()))
        return f"{self.arch}({kwargs})" if kwargs else self.arch

    @property
    def classes(self) -> str:
        return f"{len(self.class_names)} classes ({', '.join(self.class_names)})"


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data: numbers, strings, booleans, None, and lists and string-keyed dicts of them."""
    if isinstance(value, list | tuple):
        return all(map(_plain, value))
    if isinstance(value, Mapping):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return isinstance(value, PLAIN)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file or sharded directory onto the CPU, safely; user mistakes raise ``UserError``.

    A sharded directory yields Lightning's metadata and the full ``state_dict`` (not the optimizer states),
    gathered in this one process with no process group. ``mmap``: a file's tensors are read from disk only where
    they are used (a process that needs its shards reads those alone).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_sharded(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    return _torch_load(path, mmap=mmap)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's hyperparameters, epoch, step and the like, checked as ``load_checkpoint`` does, tensors unread.

    A file is memory-mapped, so its tensors cost nothing. A sharded directory gives its ``meta.pt``, once its
    ``.metadata`` and every non-tensor entry of its shards have been checked (``imgcls.shards.check_folder``): after
    that it is safe to hand to Lightning, whose loader would unpickle them with plain ``pickle``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        from imgcls.shards import check_folder  # DCP's modules, imported only for folders

        check_folder(path)
        return _torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else {}
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    return _torch_load(path, mmap=True)


def tensor_names(path: str | Path) -> list[str]:
    """The names of a checkpoint's weights (``state_dict``), read without reading the weights."""
    path = Path(path).expanduser()
    if path.is_dir():
        from imgcls.shards import read_metadata as read_folder_metadata  # DCP's modules, imported only for folders

        prefix = "state_dict."
        return [key[len(prefix) :] for key in read_folder_metadata(path).state_dict_metadata if key.startswith(prefix)]
    state = read_metadata(path).get("state_dict")
    return list(state) if isinstance(state, dict) else []


def _torch_load(path: Path, mmap: bool = False) -> Any:
    try:  # only the zip format (torch.save's since 1.6) can be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:  # the pickle asks for a callable: the classic code-execution payload, or a foreign class
            raise UserError(
                f"{path}: refused, it asks to import {found[1]}; only tensors and plain data load from checkpoints"
            ) from error
        raise UserError(f"{path}: not a readable PyTorch checkpoint") from error
    except Exception as error:  # torch.load fails on corrupt files with many exception types
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error


def consolidate(shards: str | Path, output: str | Path) -> Path:
    """Write a sharded checkpoint directory as one ``.ckpt`` file: full weights and metadata, no optimizer state.

    The file loads anywhere a ``.ckpt`` does (``predict.py``, ``ImageClassifier.load_from_checkpoint``), with the
    plain network's tensors (tensor parallelism's q, k and v joined). Resume training from the directory itself, at
    any world size.
    """
    shards, output = Path(shards).expanduser(), Path(output).expanduser()
    if not shards.is_dir():
        raise UserError(f"{shards}: not a directory of checkpoint shards")
    checkpoint = _load_sharded(shards)
    checkpoint.pop("optimizer_states", None)
    checkpoint["state_dict"] = join_state(checkpoint["state_dict"])  # tensor parallelism's q, k, v: the plain layout
    tmp = output.with_name(f".{output.name}.tmp")
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as file:  # a Python file: torch's own file writer fails without the OS's reason
            torch.save(checkpoint, file)
        tmp.replace(output)  # atomic: a crash leaves the old file or the new one, never half of one
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        failure = write_failure(output, error, then="consolidate again")
        if failure is None:
            raise
        raise failure from error
    return output


def write_failure(path: Path, error: BaseException, then: str = "resume with --ckpt_path last") -> UserError | None:
    """A one-line error for a checkpoint that the system refused to write (a full disk, a quota, ``ulimit -f``),
    saying to make room and ``then``; ``None`` for any other failure.

    torch.save's zip writer meets the OSError and then fails again on closing: the OSError is the first exception
    of the chain, the one that says why.
    """
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if error is None:
        return None
    return UserError(
        f"{path}: the checkpoint could not be written ({error.strerror or error}); the one before, if any, is "
        f"unchanged: make room (disk space, quota, ulimit -f), then {then}"
    )


def _load_sharded(path: Path) -> dict[str, Any]:
    from imgcls.shards import load_entries  # DCP's modules, imported only for folders

    meta = _torch_load(path / "meta.pt") if (path / "meta.pt").is_file() else {}
    return {**meta, **load_entries(path, {"state_dict"})}


def latest_checkpoint(logs: str | Path = LOGS, name: str = f"{BEST}.ckpt") -> Path:
    """Return the most recently written ``name`` under ``logs``: a file, or a sharded folder that has its ``.metadata``.

    DCP writes ``.metadata`` last, so a sharded folder without it is one whose writing was cut off.
    """
    found = [path for path in Path(logs).glob(f"**/{name}") if path.is_file() or (path / ".metadata").is_file()]
    found.sort(key=lambda path: (path / ".metadata" if path.is_dir() else path).stat().st_mtime)
    if not found:
        raise UserError(f"no {name} under {Path(logs).resolve()}; train first (python train.py) or pass --checkpoint")
    return found[-1]


def split_names(name: str) -> list[tuple[str, int | None]]:
    """The split layout's names for plain tensor ``name``: ``[(name, None)]``, or its three parts and their index."""
    for fused, parts in FUSED.items():
        if name == fused or name.endswith(f".{fused}"):
            path = name[: len(name) - len(fused)]
            return [(path + parts.format(part), index) for index, part in enumerate(QKV_PARTS)]
    return [(name, None)]


def qkv_part(tensor: Tensor, index: int | None) -> Tensor:
    """Part ``index`` (q, k, v) of a fused tensor's row blocks; the tensor itself for ``None``."""
    return tensor if index is None else tensor.chunk(len(QKV_PARTS))[index]


def split_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A plain state dict in the split layout (fused tensors cut into q, k and v)."""
    return {new: qkv_part(tensor, index) for name, tensor in state.items() for new, index in split_names(name)}


def join_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict in the split layout made plain: q, k and v joined into ``in_proj_weight`` or ``qkv.weight``.

    Names that are not split tensors (a q without its k and v too) stay as they are, in their order, with the state
    dict's version metadata; a plain state dict comes back as it is.
    """
    if not holds_split(state):
        return state
    joined: dict[str, Tensor] = OrderedDict()
    for name, tensor in state.items():
        found = _SPLIT.match(name)
        parts = [f"{found['path']}{found['container']}.{p}.{found['kind']}" for p in QKV_PARTS] if found else []
        if not found or not all(part in state for part in parts):
            joined[name] = tensor
        elif found["part"] == QKV_PARTS[0]:  # the fused tensor takes q's place
            fused = _FUSED_FROM[f"{found['container']}.{{}}.{found['kind']}"]
            joined[found["path"] + fused] = torch.cat([state[part] for part in parts])
    if hasattr(state, "_metadata"):
        joined._metadata = state._metadata  # read by load_state_dict (versions of BatchNorm and the like)
    return joined


def holds_split(names: Iterable[str]) -> bool:
    """Whether tensors named ``names`` are in the split layout (a tensor-parallel run's)."""
    return any(_SPLIT.match(name) for name in names)
