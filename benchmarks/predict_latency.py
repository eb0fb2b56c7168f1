"""predict.py's cold start and warm per-image latency, against a plain torchvision script.

    python benchmarks/predict_latency.py                  # the newest best.ckpt under logs/, a digit image
    python benchmarks/predict_latency.py --checkpoint logs/version_0/checkpoints/best.ckpt --image cat.jpg --repeats 20

Exports the checkpoint's state dict to a temporary folder (export.py's bundle), then runs, in turn and in a
rotating order: the baseline (benchmarks/plain_torchvision.py on that folder), predict.py on that folder, and
predict.py on the checkpoint itself. Prints each one's median wall time and its ratio to the baseline's.
The goal is predict.py at most 1.15 times the baseline. Then, in this process with both models loaded, the
milliseconds to classify the image one at a time: predict.py's Predictor (open_image, then the checkpoint's
preprocessing and network) against plain_torchvision.py's functions, alternating, median of --warm_runs.
"""

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plain_torchvision  # beside this script

from imgcls.checkpoints import latest_checkpoint
from imgcls.data.images import open_image
from imgcls.errors import UserError
from imgcls.inference.export import export
from imgcls.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.15  # predict.py's cold start over the baseline's


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a .ckpt file (default: the newest best.ckpt under logs/)")
    parser.add_argument("--image", help="the image to classify (default: the first digit under data/digits/test)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each command (default: 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each command first (default: 1)")
    parser.add_argument("--warm_runs", type=int, default=200, help="timed warm classifications (default: 200)")
    args = parser.parse_args(argv)
    try:
        checkpoint = Path(args.checkpoint or latest_checkpoint())
    except UserError as error:
        sys.exit(f"error: {error}")
    digits = sorted(Path("data/digits/test").glob("*/*.png"))
    if not (args.image or digits):
        sys.exit("error: no --image and no data/digits/test (python train.py writes it)")
    image = args.image or str(digits[0])

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        export(Predictor(checkpoint), bundle, formats=())
        python, predict = sys.executable, str(REPO / "predict.py")
        commands = {
            "plain torchvision (baseline)": [python, str(REPO / "benchmarks" / "plain_torchvision.py"), str(bundle)],
            "predict.py, exported folder": [python, predict, "--checkpoint", str(bundle), "--topk", "1"],
            "predict.py, Lightning .ckpt": [python, predict, "--checkpoint", str(checkpoint), "--topk", "1"],
        }
        times = {name: [] for name in commands}  # wall seconds
        cpu_times = {name: [] for name in commands}  # user + system seconds: steadier on a busy machine
        for round_ in range(args.warmup + args.repeats):
            names = list(commands)
            for name in names[round_ % 3 :] + names[: round_ % 3]:  # rotated, so no command always runs first
                start, cpu_start = time.perf_counter(), _children_cpu()
                result = subprocess.run([*commands[name], image], capture_output=True, text=True)
                elapsed, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
                if result.returncode != 0:
                    sys.exit(f"error: {name} failed:\n{result.stderr}")
                if round_ >= args.warmup:
                    times[name].append(elapsed)
                    cpu_times[name].append(cpu)
        warm = warm_latency(bundle, image, args.warm_runs)

    baseline, cpu_baseline = (statistics.median(runs[next(iter(commands))]) for runs in (times, cpu_times))
    print(f"cold start on {image} ({checkpoint}), median of {args.repeats} runs; goal: predict.py <= {GOAL}x baseline")
    for name in commands:
        wall, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        ratios = f"ratio {wall / baseline:.2f}    cpu {cpu:5.2f} s  ratio {cpu / cpu_baseline:.2f}"
        print(f"  {name:30} wall {wall:5.2f} s  {ratios}")
    print(f"warm latency, one image at a time in a loaded process, median of {args.warm_runs} runs")
    baseline = statistics.median(next(iter(warm.values())))
    for name, runs in warm.items():
        median = statistics.median(runs)
        print(f"  {name:30} {median * 1000:6.2f} ms  ratio {median / baseline:.2f}")


def warm_latency(bundle: Path, image: str, runs: int) -> dict[str, list[float]]:
    """Seconds to classify ``image`` once, each run, by the plain script's functions and by predict.py's Predictor."""
    net, preprocess, _ = plain_torchvision.load(bundle)
    predictor = Predictor(bundle)
    sides = {
        "plain torchvision (baseline)": lambda: plain_torchvision.classify(net, preprocess, [image]),
        "predict.py's Predictor": lambda: predictor([open_image(image)], topk=1),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for run in range(runs + 10):  # the first ten warm up the allocator and caches
        for name in list(sides)[:: 1 if run % 2 == 0 else -1]:
            start = time.perf_counter()
            sides[name]()
            if run >= 10:
                times[name].append(time.perf_counter() - start)
    return times


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
