"""``python -m randsac_fast.attnprobe``: the command; the code is :mod:`randsac_fast.eval.attnprobe`."""
import sys

from .eval.attnprobe import main

if __name__ == "__main__":
    sys.exit(main())
