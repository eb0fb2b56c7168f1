"""Train an image classifier, then test its best checkpoint.

    python train.py                                              # embedded digits, CPU, under a minute
    python train.py --data.root ~/data/pets --model.backbone resnet50
    python train.py --trainer.precision=16-mixed                 # mixed precision
    python train.py --trainer.strategy=ddp --trainer.devices=4   # data parallel, one process per device
    python train.py --config configs/fsdp.yaml                   # sharded model
    python train.py --ckpt_path last                             # resume the newest run (auto: or start one)
    python train.py --print_config > my.yaml; python train.py --config my.yaml
    python train.py --inspection.histograms=true                 # weight and gradient histograms in TensorBoard
    python train.py --help

configs/default.yaml holds the defaults every other config file and flag applies over. README.md explains the
flags that matter, the strategies and the files in configs/.
"""

from pathlib import Path

from imgcls.cli import main
from imgcls.runtime import end_without_collecting

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"

if __name__ == "__main__":
    main(config=DEFAULT_CONFIG)
    end_without_collecting()
