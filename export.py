"""Export a trained classifier for programs that use none of this project, and check each export against PyTorch.

    python export.py exported/                                   # the newest best.ckpt: state dict, .pt2 and .onnx
    python export.py exported/ --checkpoint logs/version_0/checkpoints/best.ckpt --images data/digits/test
    python export.py exported/ --formats pt2                     # no ONNX (that needs: pip install -e ".[onnx]")
    python predict.py photo.jpg --checkpoint exported/           # predict.py reads the folder too

The folder holds state_dict.pt (for torchvision.models.get_model(arch, num_classes=N)), model.json (architecture,
class names, preprocessing) and the programs asked for. Each program is run on --images (else on random inputs)
in batches of several sizes, and the export fails if its logits differ from PyTorch's by more than 1e-4.
"""

import argparse
import sys
from pathlib import Path

from imgcls.errors import UserError, exit_with
from imgcls.runtime import end_without_collecting

CHECK_BATCH = 16  # images per parity-check batch; a single image is checked too, for the dynamic batch size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="DIR", help="folder to write the export to")
    parser.add_argument(
        "--checkpoint", help="a .ckpt file or a sharded checkpoint folder (default: the newest best.ckpt under logs/)"
    )
    parser.add_argument(
        "--formats", nargs="*", default=["pt2", "onnx"], choices=["pt2", "onnx"], help="programs to write besides "
        "the state dict (default: pt2 onnx; none: --formats with no value)",
    )  # fmt: skip
    parser.add_argument("--images", nargs="+", metavar="IMAGE", help="real images for the parity check: files, "
                        "folders or globs (default: random inputs)")  # fmt: skip
    args = parser.parse_args(argv)

    import torch  # imported after parsing, so --help and usage errors answer at once
    from PIL import Image

    from imgcls.checkpoints import latest_checkpoint
    from imgcls.data.images import open_image
    from imgcls.inference.export import TOLERANCE, check_formats, export, max_differences
    from imgcls.inference.files import find_images
    from imgcls.inference.predictor import Predictor

    try:
        check_formats(args.formats)
        predictor = Predictor(args.checkpoint or latest_checkpoint(), device="cpu")
        if args.images:
            images = []
            for path in find_images(args.images):
                try:
                    images.append(open_image(path))
                except (OSError, Image.DecompressionBombError) as error:
                    raise UserError(f"--images {path}: not a readable image ({error})") from error
                if too_large := predictor.too_large(images[-1]):
                    raise UserError(f"--images {path}: refused, {too_large}")
            inputs = predictor.preprocess(images)
            what = f"{len(images)} images"
        else:
            size = predictor.spec.preprocess["crop_size"]
            inputs = torch.randn(CHECK_BATCH + 1, 3, size, size, generator=torch.Generator().manual_seed(0))
            what = f"{len(inputs)} random inputs"
        written = export(predictor, Path(args.output), args.formats)
    except UserError as error:
        exit_with(error)

    batches = [*inputs.split(CHECK_BATCH), inputs[:1]]
    differences = max_differences(predictor, written, batches)
    arch, num_classes = predictor.spec.arch, len(predictor.class_names)
    print(f"{written['state_dict']}  the weights of a {num_classes}-class {arch}")
    print(f"{written['manifest']}  how to build it, class names, preprocessing")
    how = f"{len(batches) - 1} batches of at most {CHECK_BATCH}, then the first alone"  # varied batch sizes
    for fmt, difference in differences.items():
        print(f"{written[fmt]}  max |Δlogits| {difference:.1e} against PyTorch on {what} ({how})")
    failed = [fmt for fmt, difference in differences.items() if not difference <= TOLERANCE]  # NaN fails too
    if failed:
        sys.exit(f"error: {', '.join(failed)} export differs from PyTorch by more than {TOLERANCE:g}")


if __name__ == "__main__":
    main()
    end_without_collecting()
