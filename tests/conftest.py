import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tiny runs for tests: one epoch is ~19 batches of the embedded digits.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.enable_progress_bar=false",
    "--data.num_workers=0",
]


def shell_env() -> dict[str, str]:
    """A fresh shell's environment: no rendezvous variables left behind by in-process distributed tests."""
    leaked = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"}
    return {key: value for key, value in os.environ.items() if key not in leaked} | {"PYTHONUNBUFFERED": "1"}


def run(script: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, in ``cwd``."""
    result = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd, env=shell_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    # A C++ abort in a launched rank leaves rank 0's exit status untouched: look for it in the shared stderr.
    assert "terminate called" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real two-epoch training run on the embedded digits, shared by the tests that only read its results."""
    from imgcls.cli import main

    workdir = tmp_path_factory.mktemp("trained")
    old = Path.cwd()
    os.chdir(workdir)
    try:
        cli = main(["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"])
    finally:
        os.chdir(old)
    assert cli.trainer.callback_metrics["test/acc"] >= 0.9
    return workdir / cli.trainer.log_dir


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test in an empty folder, as a user running train.py from a fresh checkout would."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
