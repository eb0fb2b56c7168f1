"""End to end: `python train.py` against the plain PyTorch script of the same recipe, as whole processes.

    python benchmarks/end_to_end.py                       # 5 pairs, seeds 0-4, 5 epochs
    python benchmarks/end_to_end.py --seeds 0 1 --epochs 2 -- --data.num_workers=0   # flags after -- go to train.py

What a user compares: the time from typing the command to a tested model, and its test accuracy. The template is
`python train.py` with its defaults (resnet18 on the embedded digits, every default feature on); the baseline is
`benchmarks/plain_train.py`, the script one would write with the same recipe. Both read the digits already written
to data/digits (as after the quickstart), in one folder. Each pair runs both with the same seed
(`--seed_everything` and `--data.seed` for the template), the side that goes first alternating from pair to pair.
Prints each pair's wall times and test accuracies, the median of the pairs' ratios template/plain (goal: at most
1.05) and each side's mean test accuracy (goal: the template's within 0.3 points of the plain script's, or better).
"""

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgcls.data.digits import DIGITS_ROOT, write_digits

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO, GOAL_POINTS = 1.05, 0.3
TEST_ACC = {"template": r"test/acc\s*│\s*([0-9.]+)", "plain": r"test acc ([0-9.]+)"}


def run(side: str, seed: int, epochs: int, folder: Path, extra: list[str]) -> tuple[float, float]:
    """Wall seconds of one whole process, and the test accuracy it printed."""
    if side == "template":
        command = [str(REPO / "train.py"), f"--seed_everything={seed}", f"--data.seed={seed}",
                   f"--trainer.max_epochs={epochs}", *extra]  # fmt: skip
    else:
        command = [
            str(REPO / "benchmarks" / "plain_train.py"),
            str(DIGITS_ROOT),
            f"--seed={seed}",
            f"--epochs={epochs}",
        ]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *command], cwd=folder, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder / "logs", ignore_errors=True)  # each run starts as the first: no gigabytes of old runs
    found = re.search(TEST_ACC[side], result.stdout)
    if result.returncode != 0 or found is None:
        sys.exit(f"error: the {side} run failed:\n{result.stderr[-3000:]}")
    return seconds, float(found[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one pair per seed")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of both sides (train.py's default)")
    parser.add_argument("train_args", nargs="*", help="flags for train.py, after --")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_digits(folder / DIGITS_ROOT)
        print(f"end to end, whole processes, on the digits in data/digits: {len(args.seeds)} pairs, alternating")
        print(f"  {'seed':>4} {'template s':>10} {'plain s':>8} {'ratio':>6} {'template acc':>12} {'plain acc':>9}")
        pairs = []
        for index, seed in enumerate(args.seeds):
            sides = ("template", "plain") if index % 2 == 0 else ("plain", "template")
            timed = {side: run(side, seed, args.epochs, folder, args.train_args) for side in sides}
            (t, t_acc), (p, p_acc) = timed["template"], timed["plain"]
            pairs.append((t, p, t_acc, p_acc))
            print(f"  {seed:>4} {t:10.1f} {p:8.1f} {t / p:6.3f} {t_acc:12.4f} {p_acc:9.4f}", flush=True)
    ratio = statistics.median(t / p for t, p, _, _ in pairs)
    t_acc, p_acc = (statistics.mean(pair[i] for pair in pairs) for i in (2, 3))
    points = 100 * (p_acc - t_acc)
    fast, close = ("met" if ok else "NOT met" for ok in (ratio <= GOAL_RATIO, points <= GOAL_POINTS))
    print(f"  median ratio template/plain {ratio:.3f} (goal <= {GOAL_RATIO}: {fast})")
    print(f"  mean test accuracy: template {t_acc:.4f}, plain {p_acc:.4f} (goal: within {GOAL_POINTS} points: {close})")


if __name__ == "__main__":
    main()
