"""Exporting a trained classifier for programs outside this project: a torchvision state dict, torch.export, ONNX.

Each program written is loaded back and compared with the PyTorch model it came from (``max_differences``).
"""

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from imgcls.backbones.factory import ARCH_DEFAULTS
from imgcls.errors import UserError
from imgcls.inference.exported import MANIFEST, STATE_DICT, write_bundle
from imgcls.inference.predictor import Predictor

PROGRAMS = {"pt2": "model.pt2", "onnx": "model.onnx"}  # format -> file name in the bundle
TOLERANCE = 1e-4  # the most an exported program's logits may differ from PyTorch's
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
ONNX_SINGLE_FILE_BYTES = 2**30  # protobuf caps a file at 2 GiB: larger weights go to model.onnx.data


def check_formats(formats: Sequence[str]) -> None:
    """Raise ``UserError`` before any work if a format needs packages that are not installed."""
    missing = [name for name in ONNX_PACKAGES if "onnx" in formats and importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"--formats onnx needs {', '.join(missing)}: pip install -e '.[onnx]', or leave onnx out of --formats"
        )


def export(predictor: Predictor, directory: Path, formats: Sequence[str]) -> dict[str, Path]:
    """Write the bundle (state dict, ``model.json``) and the programs in ``formats`` of a CPU predictor's network.

    Returns format -> file written. The programs take a float32 batch ``(N, 3, crop_size, crop_size)`` on the CPU,
    any ``N``, and return ``(N, num_classes)`` logits.
    """
    check_formats(formats)
    directory.mkdir(parents=True, exist_ok=True)
    net = predictor.net
    size = predictor.spec.preprocess["crop_size"]
    example = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)),)
    dynamic = ({0: torch.export.Dim("batch", min=1)},)  # the batch size, in the argument's shape
    written = {"state_dict": directory / STATE_DICT, "manifest": directory / MANIFEST}
    if "pt2" in formats:
        written["pt2"] = directory / PROGRAMS["pt2"]
        torch.export.save(torch.export.export(net, example, dynamic_shapes=dynamic), written["pt2"])
    if "onnx" in formats:
        written["onnx"] = directory / PROGRAMS["onnx"]
        weight_bytes = sum(tensor.nbytes for tensor in net.state_dict().values())
        torch.onnx.export(
            net,
            example,
            written["onnx"],
            dynamic_shapes=dynamic,
            input_names=["images"],
            output_names=["logits"],
            external_data=weight_bytes > ONNX_SINGLE_FILE_BYTES,
            verbose=False,
        )
    programs = {fmt: path.name for fmt, path in written.items() if fmt in PROGRAMS}
    # what create_backbone always passes (GoogLeNet's and Inception's heads off): a plain get_model call must be told
    defaults = ARCH_DEFAULTS.get(predictor.spec.arch, {})
    spec = replace(predictor.spec, arch_kwargs={**defaults, **predictor.spec.arch_kwargs})
    write_bundle(directory, spec, net.state_dict(), programs)
    return written


def max_differences(predictor: Predictor, programs: dict[str, Path], batches: list[torch.Tensor]) -> dict[str, float]:
    """Run each exported program on ``batches`` and return its largest |Δlogit| against the PyTorch model."""
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if "pt2" in programs:
        runners["pt2"] = torch.export.load(programs["pt2"]).module()
    if "onnx" in programs:
        import onnxruntime  # an optional extra: imported only when ONNX was asked for

        session = onnxruntime.InferenceSession(programs["onnx"], providers=["CPUExecutionProvider"])
        runners["onnx"] = lambda batch: torch.from_numpy(session.run(None, {"images": batch.numpy()})[0])
    net = predictor.net
    worst = dict.fromkeys(runners, 0.0)
    with torch.inference_mode():
        for batch in batches:
            expected = net(batch)
            for fmt, run in runners.items():
                worst[fmt] = max(worst[fmt], (run(batch) - expected).abs().max().item())
    return worst
