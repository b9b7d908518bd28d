"""``python -m randsac_fast.data make-shards SRC_DIR OUT_DIR [--shard-size N] [--prefix P] [--seed S]``."""
from __future__ import annotations

import argparse
import sys

from .images import DataError
from .shards import make_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m randsac_fast.data", description="Data set tools.")
    sub = p.add_subparsers(dest="command", required=True)
    ms = sub.add_parser("make-shards", help="write an ImageFolder tree as WebDataset tar shards")
    ms.add_argument("src_dir", help="ImageFolder root: SRC_DIR/<class>/<image>")
    ms.add_argument("out_dir", help="folder for <prefix>-NNNNNN.tar, sizes.json, classes.json")
    ms.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    ms.add_argument("--prefix", default="train", help="shard file-name prefix (default train)")
    ms.add_argument("--seed", type=int, default=0, help="seed of the order images are written in (default 0)")
    args = p.parse_args(argv)
    try:
        pattern = make_shards(args.src_dir, args.out_dir, args.shard_size, args.prefix, args.seed)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote shards; train with --data '{pattern}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
