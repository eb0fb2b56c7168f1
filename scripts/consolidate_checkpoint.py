"""Turn a sharded checkpoint directory (written by --trainer.strategy=fsdp) into one .ckpt file.

    python scripts/consolidate_checkpoint.py logs/version_0/checkpoints/best.ckpt best-full.ckpt

Lightning's own ``consolidate_checkpoint`` fails on FSDP2 (ModelParallelStrategy) checkpoints; this one reads
both in a single process, with no GPU and no process group, and refuses pickles that would run code.
"""

import argparse

from imgcls.checkpoints import consolidate
from imgcls.errors import UserError, exit_with

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="the sharded checkpoint directory")
    parser.add_argument("output", help="the .ckpt file to write")
    args = parser.parse_args()
    try:
        print(consolidate(args.shards, args.output))
    except UserError as error:
        exit_with(error)
