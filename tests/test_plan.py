"""The memory planner: parameter counts, closed-form model state, ``train.py --plan`` and ``auto_fit``."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from helpers import QUICK, REPO, train
from jsonargparse import Namespace
from torch import nn

from imgcls.backbones.weights import resolve_weights
from imgcls.model import ImageClassifier
from imgcls.parallel.fsdp2 import FSDP2Strategy
from imgcls.planner.cli import configured_strategy
from imgcls.planner.options import parse_size
from imgcls.planner.plan import estimate, largest_batch, parameter_count
from imgcls.planner.step_memory import Job, StrategySpec, step_memory

SINGLE = StrategySpec("auto", "single device")
FSDP2 = StrategySpec("fsdp", "fsdp", shard=True)


def classifier(backbone: str, **backbone_kwargs: object) -> ImageClassifier:
    """The module the planner builds: an ImageClassifier with its network."""
    module = ImageClassifier(backbone=backbone, num_classes=10, backbone_kwargs=backbone_kwargs)
    module.configure_model()
    return module


@pytest.mark.slow
def test_parameter_counts_match_torchvision_for_every_model_with_weights() -> None:
    checked = 0
    for name in torchvision.models.list_models(module=torchvision.models):
        for weights in torchvision.models.get_model_weights(name):
            kwargs = resolve_weights(name, weights.name).arch_kwargs()  # ViT SWAG weights: larger position embeddings
            if name == "inception_v3":
                kwargs["aux_logits"] = True  # published with its auxiliary head, which the template leaves out

            def build(name: str = name, kwargs: dict = kwargs) -> nn.Module:
                module = ImageClassifier(backbone=name, backbone_kwargs=kwargs)  # 1000 classes, as published
                module.configure_model()
                return module

            assert parameter_count(build) == weights.meta["num_params"], (name, weights.name)
            checked += 1
    assert checked > 100


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "weight", "grad", "adam"), [("32-true", 4, 4, 8), ("bf16-mixed", 4, 4, 8), ("bf16-true", 2, 2, 4)]
)
def test_model_state_bytes_are_the_closed_form(precision: str, weight: int, grad: int, adam: int) -> None:
    """fp32 AdamW: 4 + 4 + 8 bytes per parameter. Mixed precision as Lightning does it keeps fp32 weights, gradients
    and moments (autocast's 16-bit copies are activations, next test); bf16-true: 2 + 2 + 4. AdamW also keeps one
    4-byte step count per parameter tensor."""
    job = Job(lambda: classifier("resnet18"), torch.optim.AdamW, batch_size=2, image_size=32, precision=precision)
    params = list(classifier("resnet18").parameters())
    count, tensors = sum(p.numel() for p in params), len(params)
    single = step_memory(job, SINGLE, 2)
    assert (single.params, single.grads, single.optimizer) == (weight * count, grad * count, adam * count + 4 * tensors)

    # Two DDP processes: the same, and DDP's gradient buckets, one more copy of the gradients for the whole step.
    ddp = step_memory(replace(job, world_size=2), StrategySpec("ddp", "ddp", buckets=True), 2)
    assert ddp.forward_backward - single.forward_backward == ddp.update - single.update == grad * count

    # FSDP2 over 2 ranks: rank 0 holds the first ceil(rows / 2) rows of every parameter.
    shard = sum(math.ceil(p.shape[0] / 2) * p[0].numel() for p in params)
    fsdp = step_memory(replace(job, world_size=2), FSDP2, 2)
    assert (fsdp.params, fsdp.grads, fsdp.optimizer) == (weight * shard, grad * shard, adam * shard + 4 * tensors)


@pytest.mark.slow
def test_mixed_precision_activations_hold_16_bit_copies_of_the_weights() -> None:
    """Autocast makes a bf16 copy of every weight matrix it multiplies with and keeps it for the backward: 2 bytes
    per weight (a ViT at 32 pixels has few other activations)."""
    job = Job(lambda: classifier("vit_b_16", image_size=32), torch.optim.AdamW, batch_size=1, image_size=32)
    matrices = sum(p.numel() for p in classifier("vit_b_16", image_size=32).parameters() if p.ndim == 2)
    fp32 = step_memory(job, SINGLE, 1)
    mixed = step_memory(replace(job, precision="bf16-mixed"), SINGLE, 1)
    assert mixed.params == fp32.params  # the weights stay fp32
    assert 2 * matrices <= mixed.activations - fp32.activations / 2 <= 2 * matrices * 1.05


@pytest.mark.slow
def test_largest_batch_fits_and_one_more_does_not() -> None:
    """Far from the planned batch the peak bends upwards (another moment of the step takes over); the search finds
    the exact largest batch anyway. Checkpointed blocks bend the most."""
    job = Job(lambda: classifier("resnet18"), torch.optim.AdamW, batch_size=4, image_size=64)
    strategy = StrategySpec("fsdp_checkpointing", "fsdp + activation checkpointing", shard=True, checkpoint=True)
    start, budget = estimate(job, strategy), 2**30
    largest = largest_batch(job, start, budget)
    assert start.peak_at(largest + 1) < budget  # a straight line from the planned batch would overshoot
    fits, too_many = (step_memory(replace(job, batch_size=n), strategy, n) for n in (largest, largest + 1))
    assert max(fits.forward_backward, fits.update) <= budget < max(too_many.forward_backward, too_many.update)


class Gated(nn.Module):
    """Checks a value before its second layer, as some networks do: fake tensors have no values to read."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.first(images).relu()
        if int(torch.ones_like(x, dtype=torch.long).sum()) == x.numel():  # true for any values, even uninitialised
            x = self.second(x).relu()
        return self.head(x.mean((2, 3)))


def test_a_network_that_does_not_trace_is_measured_with_real_batches_and_extrapolated() -> None:
    job = Job(Gated, torch.optim.AdamW, batch_size=8, image_size=64)
    planned = estimate(job, SINGLE)
    assert planned.measured
    assert planned.peak == step_memory(job, SINGLE, 8, fake=False).forward_backward  # activations are linear


@pytest.mark.parametrize(
    ("value", "memory"),
    [
        ("auto", SINGLE.memory),
        ("ddp_find_unused_parameters_true", StrategySpec("", "", buckets=True).memory),
        ("fsdp_cpu_offload", StrategySpec("", "", shard=True, offload=True).memory),
        (
            Namespace(class_path="imgcls.parallel.fsdp2.FSDP2Strategy", init_args=Namespace(checkpoint_blocks=True)),
            StrategySpec("", "", shard=True, checkpoint=True).memory,
        ),
        (  # configs/fsdp.yaml with configs/fsdp_hybrid.yaml
            {"class_path": "imgcls.parallel.fsdp2.FSDP2Strategy", "init_args": {"shard_group_size": "node"}},
            StrategySpec("", "", shard=True, hybrid=True).memory,
        ),
        ("fsdp_hybrid", StrategySpec("", "", shard=True, hybrid=True).memory),
        ("deepspeed_stage_3", None),
    ],
)
def test_configured_strategy_is_read_from_the_config(value: object, memory: tuple | None) -> None:
    configured = configured_strategy(value, world_size=1)
    assert (configured.memory if configured else None) == memory


@pytest.mark.parametrize(("text", "size"), [("80GiB", 80 * 2**30), ("40 GB", 40 * 10**9), ("81920MiB", 80 * 2**30)])
def test_device_memory_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def table(out: str) -> dict[str, dict[str, float]]:
    """The plan's rows by strategy flag: the sizes by column, and whether it is the configured one."""
    rows = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 7 and words[-1] in ("yes", "no") and words[0].startswith(("auto", "ddp", "fsdp")):
            sizes = map(float, words[-6:-1])
            rows[words[0]] = {
                **dict(zip(("params", "grads", "optim", "activ", "peak"), sizes, strict=True)),
                "*": words[1] == "*",
            }
    return rows


@pytest.mark.slow
def test_plan_prints_each_strategy_and_the_recommendation_without_allocating(
    in_tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tests" / "scripts"))
    from allocator_peak import allocations, peak_bytes

    with allocations() as profiler:  # the CPU allocator's own count, read by the profiler
        cli = train(["--plan", "--plan.device_memory=512MiB", "--trainer.devices=4", "--data.batch_size=256"])
    out = capsys.readouterr().out
    assert cli.trainer is None and not (in_tmp / "logs").exists()  # no training
    plan = cli.plan
    assert plan.job.world_size == 4 and plan.job.batch_size == 256 and plan.budget == int(512 * 2**20 * 0.9)
    held = plan.estimates[0]
    assert peak_bytes(profiler) < (held.params + held.activations) / 4  # neither the network nor a batch is real

    rows = table(out)
    assert list(rows) == ["ddp", "fsdp", "fsdp_checkpointing", "fsdp_cpu_offload", "fsdp_cpu_offload_checkpointing"]
    assert rows["ddp"]["*"] and not any(row["*"] for row in list(rows.values())[1:])  # auto on 4 devices: ddp
    peak = {flag: row["peak"] for flag, row in rows.items()}
    assert peak["fsdp_checkpointing"] < peak["fsdp"] < peak["ddp"]
    assert peak["fsdp_cpu_offload"] < peak["fsdp"] and rows["fsdp_cpu_offload"]["optim"] == 0
    assert rows["fsdp"]["params"] == pytest.approx(rows["ddp"]["params"] / 4, abs=0.01)
    best = plan.recommended
    assert best is not None and not any(plan.fits(e) for e in plan.estimates[: plan.estimates.index(best)])
    assert f"recommended: --trainer.strategy={best.strategy.flag}," in out
    assert f"largest batch per device that fits with {best.strategy.flag}: {plan.max_batch:,}" in out

    # The command line builds the Job the accuracy tests build: digits' 10 classes, 32-pixel crops, AdamW.
    job = Job(lambda: classifier("resnet18"), torch.optim.AdamW, 256, 32, world_size=4, devices_per_node=4, gpu=True)
    assert estimate(job, best.strategy).peak == best.peak


def test_plan_has_a_hybrid_row_on_several_nodes_and_counts_whole_gradients_while_accumulating(
    in_tmp: Path, capsys: pytest.CaptureFixture
) -> None:
    # 2 nodes of 2, 4 micro-batches a step; configured: fsdp reducing every micro-batch, as without accumulation
    plan = train(
        ["--plan", "--plan.device_memory=80GiB", "--trainer.devices=2", "--trainer.num_nodes=2",
         "--trainer.accumulate_grad_batches=4", f"--config={REPO / 'configs' / 'fsdp.yaml'}",
         "--trainer.strategy.sync_every_micro_batch=true"]
    ).plan  # fmt: skip
    out = capsys.readouterr().out
    rows = table(out)
    assert list(rows)[:3] == ["ddp", "fsdp_hybrid", "fsdp"]  # cheapest first: all-gathers stay within a node
    assert rows["fsdp_hybrid"]["params"] == pytest.approx(rows["ddp"]["params"] / 2, abs=0.01)  # 2 shards, not 4
    assert rows["fsdp"]["params"] == pytest.approx(rows["ddp"]["params"] / 4, abs=0.01)
    assert "accumulating 4 micro-batches: fsdp holds whole gradients between them" in out

    # Without a reduce-scatter per micro-batch, the last micro-batch starts with the whole fp32 gradients of the
    # ones before, and frees them unit by unit (test_plan_accuracy.py measures this on 2 processes).
    fsdp = next(e for e in plan.estimates if e.strategy.flag == "fsdp")
    resharding = plan.configured
    assert resharding not in plan.estimates and resharding.params == fsdp.params
    grown = fsdp.forward_backward - resharding.forward_backward
    assert 0.3 * 4 * plan.parameters < grown <= 4 * plan.parameters
    assert fsdp.update == resharding.update


def test_plan_errors_are_one_line(in_tmp: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: --plan.device_memory lots: give a size such as 80GiB"):
        train(["--plan", "--plan.device_memory=lots"])


@pytest.mark.slow
def test_auto_fit_applies_the_cheapest_strategy_that_fits(in_tmp: Path, capsys: pytest.CaptureFixture) -> None:
    args = [*QUICK, "--trainer.accelerator=cpu", "--data.crop_size=96", "--data.batch_size=32"]
    plan = train([*args, "--plan", "--plan.headroom=0"]).plan
    single, sharded, checkpointed = plan.estimates
    assert checkpointed.peak < min(single.peak, sharded.peak)
    # Memory for checkpointed blocks, not for the others: auto_fit goes past the cheaper two.
    try:
        cli = train(
            [*args, "--trainer.strategy=auto_fit", f"--plan.device_memory={checkpointed.peak}B", "--plan.headroom=0"]
        )
    finally:  # Lightning leaves FSDP2's process group behind; the next plan in this process needs a fake one
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and strategy.checkpoint_blocks and not strategy.cpu_offload
    assert "test/acc" in cli.trainer.callback_metrics
    assert "auto_fit: --trainer.strategy=fsdp_checkpointing" in capsys.readouterr().out
    config = yaml.safe_load((Path(cli.trainer.log_dir) / "config.yaml").read_text())
    assert config["trainer"]["strategy"] == "fsdp_checkpointing"


@pytest.mark.slow
def test_auto_fit_refuses_a_batch_that_fits_nowhere(in_tmp: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: --trainer.strategy auto_fit: no strategy fits in 1 MiB per device"):
        train(["--trainer.strategy=auto_fit", "--trainer.accelerator=cpu", "--plan.device_memory=1MiB"])
