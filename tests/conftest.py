import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import train


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real two-epoch training run on the embedded digits, shared by the tests that only read its results."""
    workdir = tmp_path_factory.mktemp("trained")
    old = Path.cwd()
    os.chdir(workdir)
    try:
        # One process: the progress bar would add only output here (multi-process tests keep it on).
        cli = train(["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false"])
    finally:
        os.chdir(old)
    assert cli.trainer.callback_metrics["test/acc"] >= 0.9
    return workdir / cli.trainer.log_dir


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test in an empty folder, as a user running train.py from a fresh checkout would."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for in-process training (two, on a CPU shared with other jobs, wait on each other many
    times over); and deterministic algorithms off again after a test that turned them on."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
