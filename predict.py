"""Classify images with a trained checkpoint or an exported model, on the CPU or a GPU, without Lightning.

python predict.py data/digits/test/3/0062.png                 # the newest run's best checkpoint
python predict.py photos/ "more/**/*.jpg" --batch-size 64     # folders (recursive) and globs, in batches
python predict.py cat.jpg --checkpoint logs/version_0/checkpoints/best.ckpt --topk 3
python predict.py photos/ --checkpoint exported/              # a folder written by export.py
python predict.py photos/ --json > answers.jsonl              # one JSON object per image (or --csv)
python predict.py photos/ --save-annotated annotated/         # copies with the top label drawn on
"""

import argparse
import os
import sys
from pathlib import Path

from imgcls.errors import UserError, exit_with
from imgcls.runtime import end_without_collecting


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders (recursive) or glob patterns")
    parser.add_argument(
        "--checkpoint",
        help="a .ckpt file, a sharded checkpoint folder or a folder written by export.py "
        "(default: the newest best.ckpt under logs/)",
    )
    parser.add_argument("--topk", type=int, default=5, help="how many classes to show per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object per image")
    output.add_argument("--csv", action="store_true", help="print CSV: image, then label and probability per rank")
    parser.add_argument("--save-annotated", metavar="DIR", help="write each image with its top class drawn on it")
    args = parser.parse_intermixed_args(argv)  # images may come after options too
    for flag in ("topk", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    # Imported after parsing, so --help and usage errors answer at once; none of these imports Lightning.
    import torch
    from PIL import Image

    from imgcls.checkpoints import latest_checkpoint
    from imgcls.data.images import open_image
    from imgcls.inference.files import find_images
    from imgcls.inference.predictor import Predictor
    from imgcls.inference.writers import PredictionWriter, annotated_paths, save_annotated

    try:
        paths = find_images(args.images)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu")
        checkpoint = args.checkpoint or latest_checkpoint()
        predictor = Predictor(checkpoint, device=device)
    except UserError as error:
        exit_with(error)
    if args.checkpoint is None:  # picked here: say which, since the newest run may not be the one meant
        classes = predictor.class_names
        shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
        print(f"checkpoint: {checkpoint} (classes: {shown}); choose another with --checkpoint", file=sys.stderr)

    names = [str(path) for path in paths]
    topk = min(args.topk, len(predictor.class_names))
    fmt = "json" if args.json else "csv" if args.csv else "table"
    writer = PredictionWriter(fmt, sys.stdout, topk, max(map(len, names)), max(map(len, predictor.class_names)))
    annotated = annotated_paths(paths, Path(args.save_annotated)) if args.save_annotated else None
    unreadable = 0
    for start in range(0, len(paths), args.batch_size):
        batch = []  # (index into paths, image)
        for index in range(start, min(start + args.batch_size, len(paths))):
            try:
                image = open_image(paths[index])
            except (OSError, Image.DecompressionBombError) as error:  # one bad file does not stop the others
                problem = f"not a readable image ({error})"
            else:
                too_large = predictor.too_large(image)  # its resize would take gigabytes
                problem = f"refused, {too_large}" if too_large else None
            if problem:
                unreadable += 1
                print(f"error: {names[index]}: {problem}", file=sys.stderr)
            else:
                batch.append((index, image))
        predictions = predictor([image for _, image in batch], topk=topk) if batch else []
        for (index, image), prediction in zip(batch, predictions, strict=True):
            writer.write(names[index], prediction)
            if annotated:
                label, probability = prediction[0]
                try:
                    save_annotated(image, f"{label} {probability:.1%}", annotated[index])
                except OSError as error:
                    sys.exit(f"error: --save-annotated: cannot write {annotated[index]} ({error})")
    if unreadable:
        sys.exit(f"error: {unreadable} of {len(paths)} images could not be read or were refused")


if __name__ == "__main__":
    try:
        main()
        end_without_collecting()
    except BrokenPipeError:  # the reader stopped early (predict.py photos/ | head): quit quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        sys.exit(1)
