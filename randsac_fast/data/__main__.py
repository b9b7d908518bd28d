"""``python -m randsac_fast.data make-shards SRC_DIR OUT_DIR [--shard-size N] [--prefix P] [--seed S]``."""
from __future__ import annotations

import argparse
import sys

from .images import DataError
from .shards import make_shards


def main(argv=None) -> int:
    from .. import started
    started()                # Ctrl-C is this command's to handle from here
    p = argparse.ArgumentParser(prog="python -m randsac_fast.data", description="Data set tools.")
    sub = p.add_subparsers(dest="command", required=True)
    ms = sub.add_parser("make-shards", help="write an ImageFolder tree as WebDataset tar shards")
    ms.add_argument("src_dir", help="ImageFolder root: SRC_DIR/<class>/<image>")
    ms.add_argument("out_dir", help="folder for <prefix>-NNNNNN.tar, sizes.json, classes.json")
    ms.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    ms.add_argument("--prefix", default="train", help="shard file-name prefix (default train)")
    ms.add_argument("--seed", type=int, default=0, help="seed of the order images are written in (default 0)")
    ms.add_argument("--force", action="store_true", help="write into an OUT_DIR that holds another command's files")
    args = p.parse_args(argv)
    from ..outputs import OutputError, OutputRefused, disk_message
    try:
        pattern = make_shards(args.src_dir, args.out_dir, args.shard_size, args.prefix, args.seed, force=args.force)
    except (DataError, OutputRefused, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {disk_message(e, getattr(e, 'filename', None) or args.out_dir)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; the shards in {args.out_dir} are incomplete — run the command again with an empty "
              "OUT_DIR", file=sys.stderr)
        return 130
    print(f"wrote shards; train with --data '{pattern}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
