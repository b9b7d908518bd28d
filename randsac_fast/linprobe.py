"""``python -m randsac_fast.linprobe``: the command; the code is :mod:`randsac_fast.eval.linprobe`."""
import sys

from .eval.linprobe import main

if __name__ == "__main__":
    sys.exit(main())
