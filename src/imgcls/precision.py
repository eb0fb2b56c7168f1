"""What ``--trainer.precision`` costs where it runs: bf16 on a CPU without bf16 instructions is emulated.

CPUs with AVX512-BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later) compute in bf16
natively. Others convert every operand to float32 and back: one ``bf16-mixed`` step of resnet18 took about 10x a
``32-true`` one on a 2-core AVX2 machine (benchmarks/RESULTS.md), so the run is refused nothing but warned.
"""

import lightning as L
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.utilities import rank_zero_warn

from imgcls.compat import torch as private


def warn_if_bf16_is_emulated(trainer: L.Trainer) -> None:
    """One warning when ``trainer`` computes in bf16 on a CPU that has no bf16 instructions."""
    if not isinstance(trainer.accelerator, CPUAccelerator) or "bf16" not in str(trainer.precision):
        return
    if private._is_avx512_bf16_supported() or private._is_amx_tile_supported():
        return
    rank_zero_warn(
        f"--trainer.precision {trainer.precision}: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 "
        "is emulated, several times slower than 32-true; on this machine use --trainer.precision 32-true"
    )
