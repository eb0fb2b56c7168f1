"""Part of the hostile-input suite of issue #18, class 6: tracebacks where a one-line error was promised.

What a user sees for values the flags' types refuse, values only torch can judge, damaged or misplaced checkpoint
files and exported folders, and checkpoint folders or writes the system refuses: one ``error:`` line on stderr that
names the flag or file, no traceback; exit status 2 for a command line that does not parse, 1 for the rest.
"""

import contextlib
import hashlib
import io
import json
import os
import runpy
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import QUICK, REPO, exit_message, finish, run, shell_env, start, train
from PIL import Image

from imgcls.errors import UsageError
from imgcls.model import ImageClassifier

HELP = "(train.py --help lists the flags)"
# As tests/test_reliability.py's: the embedded digits in batches of 16, without the figures and summaries.
LEAN = [*QUICK, "--data.batch_size=16", "--trainer.callbacks=null", "--trainer.enable_model_summary=false",
        "--inspection.every_n_steps=0"]  # fmt: skip


def usage_error(args: list[str]) -> str:
    """The line train.py (in this process) prints for a command line that does not parse, with exit status 2."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as stopped, contextlib.redirect_stderr(stderr):
        train(args)
    assert stopped.value.code == 2, stopped.value.code
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1, lines  # no usage, no block of union members
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--data.batch_size=0", "--data.batch_size 0: expected an integer of 1 or more, or null"),
        ("--data.batch_size=-3", "--data.batch_size -3: expected an integer of 1 or more, or null"),
        ("--data.batch_size=abc", "--data.batch_size abc: expected an integer of 1 or more, or null"),
        ("--data.crop_size=-5", "--data.crop_size -5: expected an integer of 1 or more, or null"),
        ("--data.crop_size=0", "--data.crop_size 0: expected an integer of 1 or more, or null"),
        ("--data.num_workers=-2", "--data.num_workers -2: expected an integer of 0 or more, or null"),
        ("--data.val_fraction=1", "--data.val_fraction 1: expected a number between 0 and 1, both excluded"),
        ("--data.mix_prob=2", "--data.mix_prob 2: expected a number from 0 to 1"),
        ("--data.mixup_alpha=-1", "--data.mixup_alpha -1: expected a number of 0 or more"),
        ("--model.label_smoothing=-0.1", "--model.label_smoothing -0.1: expected a number from 0 to 1"),
        ("--data.interpolation=cubic", "--data.interpolation cubic: expected one of nearest, bilinear, bicubic, "
         "lanczos, or null"),
        ("--data.augment=foo", "--data.augment foo: expected one of none, basic, strong, or null"),
        ("--data.mean=[0.5,0.5]", "--data.mean [0.5,0.5]: expected a list of 3 values, each a number, or null"),
        ("--trainer.max_epochs=abc", "--trainer.max_epochs abc: expected an integer, or null"),
        ("--model.optimizer.lr=abc", "--model.optimizer.lr abc: expected a number"),  # an argument of AdamW
    ],
)  # fmt: skip
def test_values_their_type_refuses_are_one_line_usage_errors(in_tmp: Path, flag: str, expected: str) -> None:
    assert usage_error([flag]) == f"error: {expected} {HELP}"


def test_unknown_flags_classes_and_broken_config_files_are_one_line_usage_errors(in_tmp: Path) -> None:
    (in_tmp / "broken.yaml").write_text("data: {batch_size: [1,\n")
    (in_tmp / "scalar.yaml").write_text("just a string\n")
    (in_tmp / "unknown.yaml").write_text("data:\n  nope: 1\n")
    (in_tmp / "zero.yaml").write_text("data:\n  batch_size: 0\n")
    (in_tmp / "folder.yaml").mkdir()
    expected = {
        "--data.batch_sise 3": f"--data.batch_sise: no such flag; did you mean --data.batch_size? {HELP}",
        "photos/": f"photos/: train.py takes no positional arguments, only flags {HELP}",
        "--ckpt_path": f"argument --ckpt_path: expected one argument {HELP}",
        "--model.optimizer Foo": f"--model.optimizer Foo: expected the import path of a class (Optimizer) {HELP}",
        "--model.optimizer.foo 1": f"--model.optimizer.foo: torch.optim.AdamW takes no such argument {HELP}",
        "--model.lr_scheduler torch.optim.lr_scheduler.StepLR": "--model.lr_scheduler "
        f"torch.optim.lr_scheduler.StepLR: it needs --model.lr_scheduler.step_size VALUE {HELP}",
        "--config scalar.yaml": "--config scalar.yaml: not a mapping of options, such as 'data: {batch_size: 32}'",
        "--config unknown.yaml": f"--data.nope: no such flag, in --config unknown.yaml {HELP}",
        "--config zero.yaml": f"--data.batch_size 0: expected an integer of 1 or more, or null {HELP}",
        "--config missing.yaml": f"--config missing.yaml: no such file {HELP}",
        "--config folder.yaml": f"--config folder.yaml: not a file {HELP}",
    }
    for args, line in expected.items():
        assert usage_error(args.split()) == f"error: {line}", args
    line = usage_error(["--config", "broken.yaml"])  # PyYAML's own words for what it found
    assert line.startswith("error: --config broken.yaml: not valid YAML (") and line.endswith(", line 2, column 1)")


def test_a_usage_error_as_a_user_sees_it_and_with_debug(tmp_path: Path) -> None:
    result = run("train.py", "--data.batch_size", "0", cwd=tmp_path)
    assert result.returncode == 2  # argparse's status for a command line that does not parse
    assert result.stderr == f"error: --data.batch_size 0: expected an integer of 1 or more, or null {HELP}\n"
    with pytest.raises(UsageError) as raised:  # --debug: the traceback, with jsonargparse's own account as its cause
        train(["--data.batch_size", "0", "--debug"])
    assert "Not of type PositiveInt: does not conform to restriction v>0" in str(raised.value.__cause__)


def test_help_shows_each_flags_rule(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        train(["--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--data.batch_size BATCH_SIZE" in help_text and "(type: PositiveInt | null" in help_text
    assert "Literal['nearest', 'bilinear', 'bicubic', 'lanczos']" in help_text


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.optimizer.lr=-1"], "--model.optimizer torch.optim.AdamW: Invalid learning rate: -1.0"),
        (["--model.optimizer.betas=[2,0.9]"], "--model.optimizer torch.optim.AdamW: Invalid beta parameter at index 0"),
        (["--model.optimizer=torch.optim.SGD", "--model.optimizer.nesterov=true"],
         "--model.optimizer torch.optim.SGD: Nesterov momentum requires a momentum and zero dampening"),
        (["--model.lr_scheduler=torch.optim.lr_scheduler.OneCycleLR", "--model.lr_scheduler.max_lr=0.1"],
         "--model.lr_scheduler torch.optim.lr_scheduler.OneCycleLR: You must define either total_steps OR"),
    ],
)  # fmt: skip
def test_arguments_torch_refuses_stop_the_run_before_training(in_tmp: Path, flags: list[str], expected: str) -> None:
    message = exit_message([*LEAN, *flags])
    assert message.startswith(f"error: {expected}") and "set its arguments with --model." in message
    assert not (in_tmp / "logs").exists()  # before the Trainer wrote anything


def test_trainer_values_lightning_refuses_or_divides_by_are_one_line(in_tmp: Path) -> None:
    expected = {
        "--checkpoint.every_n_train_steps=-1": "error: Invalid value for every_n_train_steps=-1. Must be >= 0",
        "--trainer.devices=[a]": "error: --trainer: `devices` selected with `CPUAccelerator` should be an int > 0.",
        "--trainer.accumulate_grad_batches=0": "error: --trainer.accumulate_grad_batches 0: Lightning divides by "
        "it; give a value above 0",  # else a ZeroDivisionError once training starts
        "--trainer.check_val_every_n_epoch=0": "error: --trainer.check_val_every_n_epoch 0: Lightning divides by "
        "it; give a value above 0",
        "--trainer.val_check_interval=0": "error: --trainer.val_check_interval 0: Lightning divides by it; give a "
        "value above 0",
    }
    for flag, line in expected.items():
        assert exit_message([*LEAN, flag]) == line


def sharded_folder(path: Path) -> Path:
    """A sharded checkpoint folder as DCP writes one, of the digits' resnet18, with Lightning's meta.pt beside it."""
    import torch.distributed.checkpoint as dcp

    module = ImageClassifier("resnet18", num_classes=10, class_names=list("0123456789"), preprocess={})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: no process group, saving in one process on purpose
        dcp.save({"state_dict": {"net.fc.bias": torch.zeros(10)}}, checkpoint_id=str(path))
    torch.save({"hyper_parameters": dict(module.hparams), "epoch": 0, "global_step": 1}, path / "meta.pt")
    return path


def test_sharded_folders_that_cannot_be_resumed_say_why(in_tmp: Path) -> None:
    folder = sharded_folder(in_tmp / "shards")
    message = exit_message([*LEAN, "--ckpt_path=shards"])  # Lightning's single-file reader: IsADirectoryError
    assert message == (
        "error: --ckpt_path shards: a sharded checkpoint (a folder), which only a sharded strategy resumes; add "
        "--trainer.strategy=fsdp (at any number of devices), or start a new run from its weights with "
        "--model.pretrained shards"
    )
    metadata = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(metadata[: len(metadata) // 2])  # a copy cut off
    for flags in ([], ["--trainer.strategy=fsdp", "--trainer.accelerator=cpu", "--trainer.devices=1"]):
        message = exit_message([*LEAN, "--ckpt_path=shards", *flags])
        assert message.startswith("error: --ckpt_path shards/.metadata: not readable (UnpicklingError: ")
        assert message.endswith("copy it again from where it was written, or use another checkpoint")
    message = exit_message([*LEAN, "--model.pretrained=shards"])
    assert message.startswith("error: shards/.metadata: not readable") and "use another checkpoint" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"arch_kwargs": [1]}, "its arch_kwargs are [1], not a mapping of the builder's arguments"),
        ({"arch_kwargs": {"nonsense": 1}}, "resnet18(nonsense=1) cannot be built (ResNet.__init__() got an unexpected "
         "keyword argument 'nonsense'); correct arch and arch_kwargs there, or export again"),
        ({"arch": "resnet19"}, "resnet19 cannot be built (Unknown model resnet19); correct arch and arch_kwargs there"),
        ({"class_names": []}, "its class_names are [], not a list of class names (one string per class)"),
        ({"class_names": [1, 2, 3]}, "its class_names are [1, 2, 3], not a list of class names"),
        ({"class_names": "abc"}, "its class_names are 'abc', not a list of class names"),
        ({"preprocess": {"crop_size": -5, "resize_size": 32}}, "unusable preprocessing settings {'crop_size': -5, "
         "'resize_size': 32} (crop_size -5 and resize_size 32 must be 1 or more); correct preprocess there"),
    ],
)  # fmt: skip
def test_exported_folders_with_a_bad_model_json_say_which_key(tmp_path: Path, change: dict, expected: str) -> None:
    # What export.py writes (the weights do not matter: each mistake is found before they are read).
    manifest = {"format_version": 1, "library": "torchvision", "arch": "resnet18", "arch_kwargs": {},
                "num_classes": 3, "class_names": ["a", "b", "c"], "preprocess": {"crop_size": 32, "resize_size": 32},
                "files": {"state_dict": "state_dict.pt"}}  # fmt: skip
    torch.save({}, tmp_path / "state_dict.pt")
    (tmp_path / "model.json").write_text(json.dumps({**manifest, **change}))
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    predict = runpy.run_path(str(REPO / "predict.py"))["main"]  # predict.py, in this process
    with pytest.raises(SystemExit) as stopped:
        predict([str(tmp_path / "img.png"), "--checkpoint", str(tmp_path)])
    assert str(stopped.value.code).startswith(f"error: {tmp_path / 'model.json'}: {expected}")


def test_an_unwritable_checkpoint_folder_stops_the_run_before_training(in_tmp: Path) -> None:
    (in_tmp / "afile").write_text("")
    blocked = in_tmp / "afile"
    expected = {
        "--checkpoint.dirpath=afile/ckpts": f"error: --checkpoint.dirpath {blocked}/ckpts: checkpoints cannot be "
        f"written there ({blocked} is a file); point --checkpoint.dirpath at a folder you can write to",
        "--trainer.logger.save_dir=afile": "error: --trainer.logger.save_dir afile: checkpoints cannot be written "
        "there (afile is a file); point --trainer.logger.save_dir at a folder you can write to",
    }
    for flag, line in expected.items():
        assert exit_message([*LEAN, flag]) == line
    assert not list(in_tmp.glob("**/version_*"))  # no run started


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder, whatever its permissions")
def test_a_read_only_log_folder_stops_the_run_before_training(in_tmp: Path) -> None:
    (in_tmp / "logs").mkdir(mode=0o555)
    message = exit_message(LEAN)
    assert message == (
        "error: --trainer.logger.save_dir logs: checkpoints cannot be written there (Permission denied); point "
        "--trainer.logger.save_dir at a folder you can write to"
    )


def test_a_consolidated_file_that_cannot_be_written_is_one_line(in_tmp: Path) -> None:
    sharded_folder(in_tmp / "shards")
    (in_tmp / "out.ckpt").write_bytes(b"the one before")
    command = f"ulimit -f 1 && exec {sys.executable} {REPO / 'scripts' / 'consolidate_checkpoint.py'} shards out.ckpt"
    (result,) = finish([start(["bash", "-c", command], in_tmp)], deadline=120)  # 1 KiB: less than the file
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr == (
        "error: out.ckpt: the checkpoint could not be written (File too large); the one before, if any, is "
        "unchanged: make room (disk space, quota, ulimit -f), then consolidate again\n"
    )
    assert sorted(path.name for path in in_tmp.iterdir()) == ["out.ckpt", "shards"]  # no .out.ckpt.tmp
    assert (in_tmp / "out.ckpt").read_bytes() == b"the one before"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished one-epoch run's checkpoint folder (best.ckpt, last.ckpt), trained in this process."""
    workdir = tmp_path_factory.mktemp("written")
    old = Path.cwd()
    os.chdir(workdir)
    try:
        cli = train(LEAN)
    finally:
        os.chdir(old)
    yield workdir / cli.trainer.checkpoint_callback.dirpath


def digests(folder: Path) -> dict[str, str]:
    """Every file in ``folder``, dot files too, by name: the SHA-256 of its bytes."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def resume_with_a_file_size_limit(checkpoints: Path, *args: str) -> tuple[int, str]:
    """Resume the run behind ``checkpoints`` as ``ulimit -f`` at half a checkpoint's size lets it (Python ignores
    SIGXFSZ, so every write past the limit fails with EFBIG); the exit status and stderr."""
    limit_kib = (checkpoints / "last.ckpt").stat().st_size // 2048
    command = f'ulimit -f {limit_kib} && exec {sys.executable} {REPO / "train.py"} "$@"'
    args = [*LEAN, "--trainer.max_epochs=2", "--ckpt_path=last", *args]
    process = start(["bash", "-c", command, "train.py", *args], checkpoints.parents[2], shell_env(OMP_NUM_THREADS="1"))
    (result,) = finish([process], deadline=300)
    return result.returncode, result.stderr


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_ends_with_one_line_and_keeps_the_one_before(checkpoints: Path) -> None:
    before = digests(checkpoints)
    status, stderr = resume_with_a_file_size_limit(checkpoints)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines == [stderr.strip().splitlines()[-1]] and lines[0].startswith("error: logs/version_0/checkpoints/")
    assert lines[0].endswith(
        ".ckpt: the checkpoint could not be written (File too large); the one before, if any, is unchanged: make "
        "room (disk space, quota, ulimit -f), then resume with --ckpt_path last"
    )
    assert digests(checkpoints) == before  # byte for byte, and no .last.ckpt.tmp left behind


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_write_on_rank_0_does_not_leave_rank_1_waiting(checkpoints: Path) -> None:
    before = digests(checkpoints)
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", "--collective_timeout=600",
           "--trainer.enable_progress_bar=true"]  # fmt: skip
    status, stderr = resume_with_a_file_size_limit(checkpoints, *ddp)
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert any("the checkpoint could not be written (File too large)" in line for line in lines), lines
    # Rank 1 waits for rank 0 in the barrier after the write: it ends as rank 0's process does, not at the timeout.
    assert any(line.startswith("error: rank 1: ") and "another process stopped" in line for line in lines), lines
    assert digests(checkpoints) == before
