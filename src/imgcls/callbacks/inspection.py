"""Looking inside training: weight and gradient histograms and gradient norms per layer group, and warnings when
gradients vanish, explode or never reach a layer."""

import math

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from imgcls.callbacks.tensorboard import tensorboard
from imgcls.errors import UserError
from imgcls.parallel.parts import local_part, pieces

# Names that torch.compile, FSDP and activation checkpointing insert between a module and its children.
WRAPPERS = {"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"}


class GradientWarning(UserWarning):
    """Gradients that vanish, explode, or never reach a trainable parameter."""


def layer_group(name: str, depth: int) -> str:
    """The first ``depth`` module names of a parameter name: ``net.layer1.0.conv1.weight`` -> ``net.layer1``."""
    modules = [part for part in name.split(".")[:-1] if part not in WRAPPERS]
    return ".".join(modules[:depth]) or name


def tensorboard_buckets() -> list[float]:
    """TensorBoard's default histogram bucket edges (``SummaryWriter.default_bins``): 0 and +-1e-12 * 1.1**k."""
    positive = [1e-12 * 1.1**k for k in range(math.ceil(math.log(1e32) / math.log(1.1)))]
    return [-v for v in reversed(positive)] + [0.0] + positive


class ParameterInspector(Callback):
    """Every ``every_n_steps`` optimizer steps, just before the step (gradients unscaled, not yet clipped), log:

    - ``grad_norm/total`` and ``grad_norm/<group>``: the 2-norms of the gradients, all and per layer group;
    - with ``histograms``, ``weights/<group>`` and ``grads/<group>``: histograms of every value in the group;

    and warn (``GradientWarning``, once per layer and kind) when a trainable parameter gets no gradient (none, or all
    zeros: it does not reach the loss), when a group's gradient norm falls below ``vanishing``, or when the total
    norm exceeds ``exploding`` or is not finite (not counted with fp16's loss scaler, which skips such steps itself).

    A layer group is the first ``group_depth`` module names of a parameter's name (``net.layer1`` for
    ``net.layer1.0.conv1.weight``). Norms and histograms cover the full tensors on every strategy. DDP: every process
    holds the same averaged gradients. FSDP (sharded parameters): each process counts its own shard
    (``DTensor.to_local()``), and the bucket counts, sums and squared norms are summed across processes, so nothing is
    gathered and the result equals the unsharded tensor's; a copy replicated on several processes counts once.

    Args:
        every_n_steps: Inspect every this many optimizer steps; ``None`` follows ``trainer.log_every_n_steps``,
            0 turns the callback off.
        histograms: Also log weight and gradient histograms (a pass over every parameter; off for speed).
        group_depth: How many leading module names make a layer group.
        vanishing: Warn when a group's gradient norm is below this (and above 0).
        exploding: Warn when the total gradient norm is above this.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        histograms: bool = False,
        group_depth: int = 2,
        vanishing: float = 1e-7,
        exploding: float = 1e3,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.histograms = histograms
        self.group_depth = group_depth
        self.vanishing = vanishing
        self.exploding = exploding
        self._warned: set[str] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.histograms and not any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
            raise UserError(
                "--inspection.histograms=true writes to TensorBoard: keep a TensorBoardLogger in --trainer.logger"
            )
        self._every = trainer.log_every_n_steps if self.every_n_steps is None else self.every_n_steps

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._every or trainer.global_step % self._every:
            return
        shards = _Shards(trainer)  # every process takes part: under sharding each holds a part of every tensor
        named = [(layer_group(name, self.group_depth), name, p) for name, p in pl_module.named_parameters()]
        trainable = [(group, name, p) for group, name, p in named if p.requires_grad]
        metrics = self._grad_norms(trainer, shards, trainable)
        if self.histograms:
            self._log_histograms(trainer, shards, "weights", [(group, p) for group, _, p in named])
            grads = [(group, p.grad) for group, _, p in trainable if p.grad is not None]
            self._log_histograms(trainer, shards, "grads", grads)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _grad_norms(
        self, trainer: L.Trainer, shards: "_Shards", trainable: list[tuple[str, str, Tensor]]
    ) -> dict[str, float]:
        squares = torch.zeros(len(trainable), device=trainer.strategy.root_device)
        for i, (_, _, p) in enumerate(trainable):
            if p.grad is not None:
                local, weight = shards.local(p.grad)
                squares[i] = torch.linalg.vector_norm(local, dtype=torch.float32).square() * weight
        squares = shards.reduce(squares, dist.ReduceOp.SUM).tolist()
        by_group: dict[str, float] = {}
        for (group, _, _), square in zip(trainable, squares, strict=True):
            by_group[group] = by_group.get(group, 0.0) + square
        norms = {group: math.sqrt(square) for group, square in by_group.items()}
        total = math.sqrt(sum(by_group.values()))
        if trainer.is_global_zero:
            self._warn(
                trainer,
                [name for (_, name, _), square in zip(trainable, squares, strict=True) if square == 0],
                norms,
                total,
            )
        return {"grad_norm/total": total, **{f"grad_norm/{group}": norm for group, norm in norms.items()}}

    def _warn(self, trainer: L.Trainer, dead: list[str], norms: dict[str, float], total: float) -> None:
        step = trainer.global_step
        if new := [name for name in dead if name not in self._warned]:
            self._once(
                new,
                f"{len(new)} trainable parameters get no gradient at step {step}: {', '.join(new)}. They "
                "do not reach the loss (an unused or detached layer): use them, or freeze them",
            )
        for group, norm in norms.items():
            if 0 < norm < self.vanishing:
                self._once(
                    [f"vanishing {group}"],
                    f"the gradient of {group} vanishes at step {step}: norm {norm:.3g} "
                    f"< --inspection.vanishing {self.vanishing:g}",
                )
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None  # fp16 skips non-finite steps itself
        if total > self.exploding or (not math.isfinite(total) and not scaled):
            self._once(
                ["exploding"],
                f"the gradients explode at step {step}: total norm {total:.3g} > "
                f"--inspection.exploding {self.exploding:g}; lower the learning rate or clip gradients "
                "(--trainer.gradient_clip_val)",
            )

    def _once(self, keys: list[str], message: str) -> None:
        if not self._warned.issuperset(keys):
            self._warned.update(keys)
            rank_zero_warn(message, category=GradientWarning)

    def _log_histograms(
        self, trainer: L.Trainer, shards: "_Shards", kind: str, tensors: list[tuple[str, Tensor]]
    ) -> None:
        groups = list(dict.fromkeys(group for group, _ in tensors))
        device = trainer.strategy.root_device
        edges = torch.tensor(tensorboard_buckets(), device=device)
        counts = torch.zeros(len(groups), len(edges) + 1, dtype=torch.long, device=device)
        sums = torch.zeros(len(groups), 2, device=device)  # sum, sum of squares
        extremes = torch.full((len(groups), 2), -math.inf, device=device)  # -min, max
        for group, tensor in tensors:
            i = groups.index(group)
            local, weight = shards.local(tensor.detach())
            values = local.float().flatten()
            values = values[values.isfinite()]
            if values.numel():
                buckets = torch.bincount(torch.bucketize(values, edges, right=True), minlength=len(edges) + 1)
                counts[i] += buckets * shards.count(tensor)
                sums[i] += torch.stack([values.sum(), values.square().sum()]) * weight
                extremes[i] = torch.maximum(extremes[i], torch.stack([-values.min(), values.max()]))
        counts = shards.reduce(counts, dist.ReduceOp.SUM) // trainer.world_size
        sums = shards.reduce(sums, dist.ReduceOp.SUM)
        extremes = shards.reduce(extremes, dist.ReduceOp.MAX)
        writer = tensorboard(trainer)
        if writer is None:
            return
        for i, group in enumerate(groups):
            bins = counts[i, 1:-1].tolist()  # bucket k + 1 is edges[k] <= v < edges[k + 1]; outside the edges: dropped
            filled = [k for k, count in enumerate(bins) if count]
            if not filled:
                continue
            first, last = filled[0], filled[-1]
            # As add_histogram writes them: each count with its bucket's right edge, after one empty bucket.
            writer.add_histogram_raw(
                f"{kind}/{group}",
                min=-extremes[i, 0].item(),
                max=extremes[i, 1].item(),
                num=sum(bins),
                sum=sums[i, 0].item(),
                sum_squares=sums[i, 1].item(),
                bucket_limits=edges[first : last + 2].tolist(),
                bucket_counts=[0, *bins][first : last + 2],
                global_step=trainer.global_step,
            )


class _Shards:
    """How a process's tensors relate to the whole ones, so that per-process sums add up to whole-tensor sums
    (``imgcls.parallel.parts``)."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.world_size = trainer.world_size

    def count(self, tensor: Tensor) -> int:
        return pieces(tensor)

    def local(self, tensor: Tensor) -> tuple[Tensor, float]:
        """This process's part of ``tensor`` and the weight of its sums."""
        return local_part(tensor, self.world_size)

    def reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=op)
        return tensor
