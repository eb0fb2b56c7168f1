"""Classify images with a trained checkpoint, on the CPU or a GPU, without Lightning.

    python predict.py data/digits/test/3/0123.png                  # the newest run's best checkpoint
    python predict.py cat.jpg dog.png --checkpoint logs/version_0/checkpoints/best.ckpt --topk 3
    python predict.py photo.jpg --json                              # one JSON object per image
"""

import argparse
import json
import sys

from imgcls.errors import UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    parser.add_argument("--checkpoint", help="a .ckpt file (default: the newest best.ckpt under logs/)")
    parser.add_argument("--topk", type=int, default=5, help="how many classes to show per image (default: 5)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    if args.topk < 1:
        parser.error("--topk must be at least 1")

    import torch  # imported after parsing, so --help and usage errors answer at once

    from imgcls.checkpoints import latest_checkpoint
    from imgcls.inference import Predictor
    from imgcls.transforms import open_image

    try:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        predictor = Predictor(args.checkpoint or latest_checkpoint(), device=device)
        images = [_open(path, open_image) for path in args.images]
        predictions = predictor(images, topk=args.topk)
    except UserError as error:
        sys.exit(f"error: {error}")
    for path, prediction in zip(args.images, predictions):
        if args.json:
            labels = [{"label": label, "probability": prob} for label, prob in prediction]
            print(json.dumps({"image": path, "predictions": labels}))
        else:
            print(path)
            for label, prob in prediction:
                print(f"  {prob:7.2%}  {label}")


def _open(path, open_image):
    try:
        return open_image(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except OSError as error:
        raise UserError(f"{path}: not a readable image ({error})") from None


if __name__ == "__main__":
    main()
