"""Time to accuracy: `python train.py` with the default config, from process start to the tested best checkpoint.

    python benchmarks/time_to_accuracy.py                 # 3 runs
    python benchmarks/time_to_accuracy.py --repeats 1 -- --trainer.max_epochs=2   # flags after -- go to train.py

Each run starts in an empty folder, as on a fresh clone: it writes the embedded digits, trains, then tests the best
checkpoint. Reads the accuracies back from the run's TensorBoard events. Prints each run's wall time, its test
accuracy and when validation first reached the goal's accuracy, then the medians. Goal: >= 97 % test accuracy
in <= 60 s on 2 CPU cores.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

REPO = Path(__file__).resolve().parents[1]
GOAL_ACCURACY, GOAL_SECONDS = 0.97, 60.0


def run_once(extra: list[str]) -> tuple[float, float, float | None]:
    """Wall seconds, test accuracy, and seconds until validation first reached ``GOAL_ACCURACY`` (or ``None``)."""
    with tempfile.TemporaryDirectory() as folder:
        start_wall, start = time.time(), time.perf_counter()
        result = subprocess.run([sys.executable, str(REPO / "train.py"), *extra], cwd=folder, capture_output=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"error: train.py failed:\n{result.stderr.decode()[-3000:]}")
        events = EventMultiplexer().AddRunsFromDirectory(str(Path(folder) / "logs"))
        events.Reload()
        scalars = {tag: [] for tag in ("val/acc", "test/acc")}
        for run, tags in events.Runs().items():
            for tag in scalars.keys() & set(tags["scalars"]):
                scalars[tag] += events.Scalars(run, tag)
    if not scalars["test/acc"]:
        sys.exit("error: train.py logged no test/acc")
    reached = sorted(event.wall_time for event in scalars["val/acc"] if event.value >= GOAL_ACCURACY)
    return seconds, scalars["test/acc"][-1].value, (reached[0] - start_wall) if reached else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of train.py (default: 3)")
    parser.add_argument("train_args", nargs="*", help="flags for train.py, after --")
    args = parser.parse_args(argv)
    runs = [run_once(args.train_args) for _ in range(args.repeats)]
    print(f"python train.py {' '.join(args.train_args)}".rstrip() + f": {args.repeats} runs, each in an empty folder")
    print(f"  {'run':>4} {'wall s':>8} {'test acc':>9} {f'val >= {GOAL_ACCURACY:.0%} at s':>16}")
    for index, (seconds, accuracy, reached) in enumerate(runs, 1):
        print(f"  {index:>4} {seconds:8.1f} {accuracy:9.4f} {'never' if reached is None else f'{reached:.1f}':>16}")
    seconds, accuracy = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    met = "met" if accuracy >= GOAL_ACCURACY and seconds <= GOAL_SECONDS else "NOT met"
    print(f"  median {seconds:6.1f} {accuracy:9.4f}   goal: >= {GOAL_ACCURACY:.0%} in <= {GOAL_SECONDS:.0f} s: {met}")


if __name__ == "__main__":
    main()
