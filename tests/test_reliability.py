"""Killed jobs, SIGTERM, NaNs, exact resume, and checkpoint mistakes: what a user sees, and what is left on disk."""

import os
import pickle
import signal
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import QUICK, exit_message, finish, run, script, shell_env, start, train
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from imgcls.callbacks.crash_safe import AtomicCheckpointIO
from imgcls.checkpoints import load_checkpoint
from imgcls.model import ImageClassifier

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# The embedded digits at 32 pixels with resnet18, as configs/default.yaml has them, in batches of 16; without the
# TensorBoard figure and summary callbacks, which cost time and are not what these tests are about.
LEAN = [*QUICK, "--data.batch_size=16", "--trainer.callbacks=null", "--trainer.enable_model_summary=false",
        "--inspection.every_n_steps=0"]  # fmt: skip
DIGITS = list("0123456789")


def every_checkpoint_loads(root: Path) -> dict[Path, dict]:
    """Load every checkpoint file under ``root`` as predict.py would; a truncated one fails here."""
    loaded = {path: load_checkpoint(path) for path in sorted(root.glob("**/*.ckpt"))}
    for checkpoint in loaded.values():
        assert checkpoint["state_dict"] and all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())
    return loaded


def logged_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run as TensorBoard reads it: (step, value) pairs by tag."""
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def fake_checkpoint(path: Path, backbone: str = "resnet18", class_names: list[str] = DIGITS) -> Path:
    """A checkpoint as this project writes one, of a fresh network: hyperparameters and weights."""
    module = ImageClassifier(backbone, num_classes=len(class_names), class_names=class_names, preprocess={})
    module.configure_model()
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


@pytest.mark.slow
def test_config_and_checkpoint_mistakes_are_one_line_errors(in_tmp: Path) -> None:
    other_classes = fake_checkpoint(in_tmp / "pets.ckpt", class_names=["cat", "dog", "emu"])
    other_network = fake_checkpoint(in_tmp / "mobile.ckpt", backbone="mobilenet_v3_small")
    torch.save(torch.nn.Linear(2, 2).state_dict(), in_tmp / "foreign.pth")
    (in_tmp / "junk.ckpt").write_bytes(b"PK\x03\x04 half a zip file")
    expected = {
        "--model.backbone=resnet19": "error: --model.backbone 'resnet19' is not a torchvision classification model; "
        "did you mean resnet18",
        f"--ckpt_path={other_classes.name}": "error: --ckpt_path pets.ckpt: trained on 3 classes (cat, dog, emu), but "
        "the data has 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9); resume with the same classes, or start a new run "
        "from its weights with --model.pretrained pets.ckpt",
        f"--ckpt_path={other_network.name}": "error: --ckpt_path mobile.ckpt: a mobilenet_v3_small checkpoint, but the "
        "model is a resnet18; resume with --model.backbone mobilenet_v3_small, or start a new run from its weights "
        "with --model.pretrained mobile.ckpt",
        "--ckpt_path=foreign.pth": "error: --ckpt_path foreign.pth: not a checkpoint of this project's ImageClassifier",
        "--ckpt_path=missing.ckpt": "error: --ckpt_path missing.ckpt: no such checkpoint file",
        "--ckpt_path=junk.ckpt": "error: --ckpt_path junk.ckpt: not a readable PyTorch checkpoint",
        "--ckpt_path=last": "error: --ckpt_path last: no last.ckpt under logs; train first, or pass --ckpt_path auto",
    }
    for flag, message in expected.items():
        assert exit_message([*LEAN, flag]).startswith(message), flag
    assert not list(in_tmp.glob("logs/*/checkpoints/*")), "a mistake must stop the run before it writes anything"

    # As a user sees it: one line on stderr, exit status 1; --debug shows the traceback instead.
    result = run("train.py", *LEAN, f"--ckpt_path={other_network.name}", cwd=in_tmp)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --ckpt_path mobile.ckpt: a mobilenet_v3_small")
    result = run("train.py", *LEAN, f"--ckpt_path={other_network.name}", "--debug", cwd=in_tmp)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "imgcls.errors.UserError: --ckpt_path mobile.ckpt: a mobilenet_v3_small checkpoint" in result.stderr


def test_malicious_checkpoints_are_refused_without_running_them(in_tmp: Path) -> None:
    marker = in_tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": Payload()}, in_tmp / "evil.ckpt")
    torch.save({"fc.weight": Payload()}, in_tmp / "evil.pth")
    shards = in_tmp / "evil_shards"  # a sharded checkpoint folder whose .metadata (plain pickle for DCP) runs code
    shards.mkdir()
    (shards / ".metadata").write_bytes(pickle.dumps(Payload()))
    torch.save({"hyper_parameters": {}}, shards / "meta.pt")
    refused = "refused, it asks to import posix.system; only tensors and plain data load from checkpoints"
    for flag, path in [
        ("--ckpt_path", "evil.ckpt"),
        ("--ckpt_path", "evil_shards"),
        ("--model.pretrained", "evil.pth"),
    ]:
        message = exit_message([*LEAN, f"{flag}={path}"])
        assert path in message and message.endswith(refused), message
    assert not marker.exists()


class NaNAtStep6(ImageClassifier):
    """The digits classifier with a NaN loss at step 6 (the second epoch's third); records gradient norms around
    clipping."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {**out, "loss": out["loss"] * float("nan")} if self.global_step == 6 else out

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0
        self.norms = [*getattr(self, "norms", []), (float(before), float(after))]


@pytest.mark.slow
def test_a_nonfinite_loss_stops_naming_the_step_or_is_skipped(in_tmp: Path) -> None:
    two_epochs = [*LEAN, "--trainer.max_epochs=2", "--trainer.limit_val_batches=1"]
    message = exit_message([*two_epochs, "--checkpoint.every_n_train_steps=1"], model_class=NaNAtStep6)
    assert message.startswith("error: the training loss is not finite (nan) at step 6 (epoch 1, batch 2); lower ")
    assert message.endswith("or pass --nonfinite_loss.action skip to skip such batches")
    last = every_checkpoint_loads(in_tmp / "logs")[in_tmp / "logs/version_0/checkpoints/last.ckpt"]
    assert last["global_step"] == 6  # written after the step before the NaN; whole, finite

    with pytest.warns(UserWarning, match=r"not finite at step 6 \(epoch 1, batch 2\); skipped that step's update"):
        cli = train(
            [*two_epochs, "--nonfinite_loss.action=skip", "--trainer.gradient_clip_val=0.5"], model_class=NaNAtStep6
        )
    last = load_checkpoint(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt")
    adam_steps = {int(state["step"]) for state in last["optimizer_states"][0]["state"].values()}
    assert last["global_step"] == 8 and adam_steps == {7}  # eight batches, seven updates
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    # --trainer.gradient_clip_val: every update's gradient norm is at most 0.5 (none for the NaN step)
    norms = cli.model.norms
    assert len(norms) == 8 and norms[6] == (0, 0) and max(before for before, _ in norms) > 0.5
    assert all(after <= 0.5 + 1e-4 for _, after in norms)


class StopsAfterTwoEpochs(ImageClassifier):
    """The digits classifier in a run stopped after its second epoch, as a preempted job would be."""

    def on_train_epoch_end(self) -> None:
        if self.current_epoch == 1:
            self.trainer.should_stop = True


@pytest.mark.slow
def test_same_seed_same_metrics_and_resume_is_exact(in_tmp: Path) -> None:
    deterministic = [*LEAN, "--trainer.deterministic=true", "--trainer.limit_train_batches=3"]
    first, second = (logged_scalars(train(deterministic).trainer.log_dir) for _ in range(2))
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"} <= first.keys()
    assert first == second

    four = [*deterministic, "--trainer.max_epochs=4"]
    straight = train(four)
    train(four, model_class=StopsAfterTwoEpochs)
    resumed = train([*four, "--ckpt_path=last"])  # the newest last.ckpt: the stopped run's
    weights = [
        load_checkpoint(Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt") for cli in (straight, resumed)
    ]
    assert weights[0]["global_step"] == weights[1]["global_step"] == 12
    assert weights[0]["state_dict"].keys() == weights[1]["state_dict"].keys()
    for name, tensor in weights[0]["state_dict"].items():
        assert torch.equal(tensor, weights[1]["state_dict"][name]), name


# The kill test: a real train.py, killed at several moments, resumed each time: 5 epochs of 4 steps, last.ckpt every
# 2 steps. Lightning 2.6.6 holds step checkpoints back until the monitored val/acc exists, so the first is written when
# the first epoch's validation ends, at step 4. One thread per process, as above.
KILLED = [*LEAN, "--trainer.max_epochs=5", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
          "--checkpoint.every_n_train_steps=2"]  # fmt: skip


def start_killed(cwd: Path, *args: str) -> subprocess.Popen:
    """Start train.py in a process group of its own (``helpers.start``), so that a signal reaches every rank."""
    return start(script("train.py", *KILLED, *args), cwd, shell_env(OMP_NUM_THREADS="1"))


def wait_for(process: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> None:
    """Poll ``condition`` every millisecond while ``process`` runs; past ``timeout``, fail with its stacks."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            (result,) = finish([process])
            raise AssertionError(f"train.py ended first: {result.stderr[-3000:]}")
        if time.monotonic() > deadline:
            finish([process], deadline=0)  # raises Hung, with the stacks
        time.sleep(0.001)


def stop(process: subprocess.Popen, signum: int = signal.SIGKILL) -> subprocess.CompletedProcess:
    os.killpg(process.pid, signum)
    (result,) = finish([process], deadline=120)
    return result


@pytest.mark.slow
def test_killed_at_any_moment_the_run_resumes_and_finishes(in_tmp: Path) -> None:
    logs = in_tmp / "logs"

    def last(version: int) -> Path:
        return logs / f"version_{version}" / "checkpoints" / "last.ckpt"

    # Early: during setup, before anything is written. --ckpt_path auto finds nothing and starts afresh.
    process = start_killed(in_tmp, "--ckpt_path=auto")
    wait_for(process, lambda: (logs / "version_0" / "config.yaml").exists())
    assert stop(process).returncode == -signal.SIGKILL
    assert not list(logs.glob("**/*.ckpt"))

    # During a checkpoint write: a later last.ckpt is being written beside the first when the job dies.
    process = start_killed(in_tmp, "--ckpt_path=auto")
    temporary = last(1).with_name(".last.ckpt.tmp")
    wait_for(process, lambda: last(1).exists() and temporary.exists())
    result = stop(process)
    assert "--ckpt_path auto: no last.ckpt under logs; starting a new run" in result.stderr
    assert temporary.exists(), "killed after the write had ended, not during it"
    written = every_checkpoint_loads(logs)[last(1)]["global_step"]  # the one before, whole
    assert written >= 4 and written % 2 == 0

    # Mid-epoch, between writes: --ckpt_path last takes the newest last.ckpt of all runs, and goes on in its folder.
    process = start_killed(in_tmp, "--ckpt_path=last")
    before = last(1).stat().st_mtime_ns
    wait_for(process, lambda: last(1).stat().st_mtime_ns != before)
    result = stop(process)
    assert "--ckpt_path last: resuming from logs/version_1/checkpoints/last.ckpt" in result.stderr
    resumed_at, written = written, every_checkpoint_loads(logs)[last(1)]["global_step"]
    assert written > resumed_at

    # SIGTERM, as a scheduler sends before preempting a job: the step in progress ends, then last.ckpt is written.
    process = start_killed(in_tmp, "--ckpt_path=last")
    before = last(1).stat().st_mtime_ns
    wait_for(process, lambda: last(1).stat().st_mtime_ns != before)
    result = stop(process, signal.SIGTERM)
    assert result.returncode == 128 + signal.SIGTERM and "Traceback" not in result.stderr
    step = int(result.stderr.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert result.stderr.rstrip().endswith(f"stopped by SIGTERM at step {step}; resume with --ckpt_path last")
    assert f"SIGTERM: saved logs/version_1/checkpoints/last.ckpt at step {step}" in result.stderr
    assert every_checkpoint_loads(logs)[last(1)]["global_step"] == step > written

    # And the last run finishes: five epochs of four steps in all, tested; every checkpoint on disk whole. Every
    # resumed run wrote into the folder of the run it resumed, without Lightning's "dirpath has changed".
    (result,) = finish([start_killed(in_tmp, "--ckpt_path=auto")])
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == 0, stderr[-3000:]
    assert "--ckpt_path auto: resuming from logs/version_1/checkpoints/last.ckpt" in stderr and "test/acc" in stdout
    assert "dirpath has changed" not in stderr
    final = every_checkpoint_loads(logs)[last(1)]
    assert (final["epoch"], final["global_step"]) == (4, 20)
    assert sorted(path.name for path in logs.iterdir()) == ["version_0", "version_1"]


def test_a_checkpoint_holds_the_state_of_its_step_while_training_goes_on(tmp_path: Path) -> None:
    # Checkpoints are written by a background thread: the next optimizer step changes the weights in place before
    # the write ends. The file must hold the weights as they were when the save was asked for.
    io, net = AtomicCheckpointIO(), torch.nn.BatchNorm1d(1_000_000)
    io.save_checkpoint({"state_dict": net.state_dict()}, tmp_path / "best.ckpt")
    with torch.no_grad():
        net.weight += 1  # the next step
    io.link(tmp_path / "best.ckpt", tmp_path / "last.ckpt")  # queued after the write, as BestAndLast does
    io.teardown()  # waits for both, as Lightning's teardown at the end of fit
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(saved["weight"], torch.ones(1_000_000))
    assert saved._metadata == net.state_dict()._metadata  # module versions, which some modules need to load
    assert (tmp_path / "last.ckpt").samefile(tmp_path / "best.ckpt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary left


def files_of(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each file's inode, size and modification time: taken in microseconds, while a save runs beside it."""
    stats = {file.name: file.stat() for file in folder.iterdir()}
    return {name: (stat.st_ino, stat.st_size, stat.st_mtime_ns) for name, stat in stats.items()}


@pytest.mark.slow
@pytest.mark.distributed
def test_killed_while_writing_shards_the_sharded_checkpoint_before_stays_whole(in_tmp: Path) -> None:
    # Two processes sharding with fsdp2 write last.ckpt as a folder of shards every 2 steps. The job dies while
    # the next one is being written: the folder from before is untouched, and resuming from it finishes the run.
    fsdp2 = ["--trainer.strategy=fsdp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    folder = in_tmp / "logs" / "version_0" / "checkpoints"
    last, partial = folder / "last.ckpt", folder / ".last.ckpt.partial"
    process = start_killed(in_tmp, *fsdp2)
    wait_for(process, lambda: (last / "meta.pt").exists() and partial.exists())
    before = files_of(last)
    stop(process)
    assert partial.exists(), "killed after the write had ended, not during it"
    assert files_of(last) == before  # the same files, not rewritten
    step = every_checkpoint_loads(in_tmp / "logs")[last]["global_step"]
    assert step >= 4 and step % 2 == 0

    result = run("train.py", *KILLED, *fsdp2, "--ckpt_path=last", cwd=in_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--ckpt_path last: resuming from logs/version_0/checkpoints/last.ckpt" in result.stderr
    assert every_checkpoint_loads(in_tmp / "logs" / "version_0")[last]["global_step"] == 20
    assert not list(folder.glob(".*.partial"))


@pytest.mark.slow
def test_last_ckpt_is_the_newest_epoch_when_validation_stops_improving(in_tmp: Path) -> None:
    # lr 0: validation accuracy never improves on the first epoch's, so best.ckpt stays at epoch 0, and a last.ckpt
    # that copied the best (Lightning's default) would send the killed run back to epoch 1.
    frozen = [*LEAN, "--trainer.max_epochs=6", "--trainer.limit_val_batches=1", "--model.optimizer.lr=0"]
    last = in_tmp / "logs" / "version_0" / "checkpoints" / "last.ckpt"

    def epoch_of(path: Path) -> int:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"] if path.exists() else -1

    process = start(script("train.py", *frozen), in_tmp, shell_env(OMP_NUM_THREADS="1"))
    wait_for(process, lambda: epoch_of(last) >= 2)
    stop(process)  # SIGKILL: no checkpoint of its own on the way out
    killed_at = epoch_of(last)
    assert killed_at >= 2 and epoch_of(last.with_name("best.ckpt")) == 0
    events = set(last.parents[1].glob("events.out.tfevents.*"))
    resumed = run("train.py", *frozen, "--ckpt_path=last", cwd=in_tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    written = set(last.parents[1].glob("events.out.tfevents.*")) - events  # the resumed run's, in the same folder
    epochs = [epoch for file in written for _, epoch in logged_scalars(str(file)).get("epoch", [])]
    assert min(epochs) == killed_at + 1  # on from the epoch after the newest, not from the best
    assert epoch_of(last) == 5


class Touch:
    """A pickled object that runs a command when unpickled: the classic payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def sharded_folder(path: Path, entries: dict) -> Path:
    """A sharded checkpoint folder as DCP writes one (in this process), with Lightning's meta.pt beside it."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: no process group, saving in one process on purpose
        dcp.save(entries, checkpoint_id=str(path))
    module = ImageClassifier("resnet18", num_classes=10, class_names=DIGITS, preprocess={})
    torch.save({"hyper_parameters": dict(module.hparams), "epoch": 0, "global_step": 1}, path / "meta.pt")
    return path


@pytest.mark.slow
def test_sharded_folders_that_would_run_code_are_refused(in_tmp: Path) -> None:
    marker = in_tmp / "pwned"
    weights = {"net.fc.weight": torch.zeros(10, 512), "net.fc.bias": torch.zeros(10)}
    in_weights = sharded_folder(in_tmp / "in_weights", {"state_dict": {**weights, "net.extra": Touch(marker)}})
    in_optimizer = sharded_folder(
        in_tmp / "in_optimizer", {"state_dict": weights, "optimizer_0": {"param_groups": [{"lr": Touch(marker)}]}}
    )
    refused = "only tensors and plain data load from checkpoints"
    Image.new("RGB", (8, 8)).save(in_tmp / "img.png")
    for command, folder, entry in [
        (["predict.py", "img.png", "--checkpoint", "in_weights"], in_weights, "state_dict.net.extra"),
        (["scripts/consolidate_checkpoint.py", "in_weights", "out.ckpt"], in_weights, "state_dict.net.extra"),
        (["train.py", *LEAN, "--model.pretrained=in_weights"], in_weights, "state_dict.net.extra"),
        (["train.py", *LEAN, "--trainer.strategy=fsdp", "--ckpt_path=in_optimizer"], in_optimizer,
         "optimizer_0.param_groups.0.lr"),
    ]:  # fmt: skip
        result = run(*command, cwd=in_tmp)
        line = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"{folder.name}: refused the entry {entry}, it asks to import posix.system" in line and refused in line
    assert not marker.exists() and not (in_tmp / "out.ckpt").exists()


def test_sharded_metadata_is_refused_before_anything_is_imported(in_tmp: Path) -> None:
    folder = sharded_folder(in_tmp / "shards", {"state_dict": {"net.fc.bias": torch.zeros(10)}})
    Image.new("RGB", (8, 8)).save(in_tmp / "img.png")
    for module, name in [("this", "s"), ("torch.distributed", "TCPStore")]:  # prints the Zen of Python; connects
        (folder / ".metadata").write_bytes(f"c{module}\n{name}\n.".encode())  # pickle protocol 0: GLOBAL, STOP
        result = run("predict.py", "img.png", "--checkpoint", str(folder), cwd=in_tmp)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f".metadata: refused, it asks to import {module}.{name}" in result.stderr
        assert "Beautiful is better than ugly" not in result.stdout + result.stderr
    (folder / ".metadata").write_bytes(b"\x80\x04\x95")  # cut off
    result = run("predict.py", "img.png", "--checkpoint", str(folder), cwd=in_tmp)
    assert result.returncode == 1 and "Traceback" not in result.stderr and ".metadata: not readable" in result.stderr
