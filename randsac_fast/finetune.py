"""``python -m randsac_fast.finetune``: the command; the code is :mod:`randsac_fast.eval.finetune`."""
import sys

from .eval.finetune import main

if __name__ == "__main__":
    sys.exit(main())
