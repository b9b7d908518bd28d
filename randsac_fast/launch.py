"""``python -m randsac_fast.launch [torchrun flags] -m randsac_fast.train [flags]``: torchrun, ending in one line.

torchrun's agent answers a failed worker with its own Python traceback and a failure table, so the
worker's one-line error (``error: ...``) ends up in the middle of the output. This launcher runs
the very same agent (``torch.distributed.run``, every torchrun flag works) and, when a worker fails,
prints that worker's error as the last line and exits with its exit code (1: bad input or a failed
run; 75: preempted, resume with ``--resume latest``; 130: interrupted). Plain ``torchrun`` works
too: its failure table names the same error under "Root Cause" (``traceback : error: ...``).
"""
from __future__ import annotations

import sys

__all__ = ["main", "first_error"]


def first_error(exc) -> tuple[int, str]:
    """(exit code, one line) of the first worker that failed, from torchrun's ChildFailedError."""
    rank, failure = exc.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    message = str(message or "").strip()
    if not message.startswith("error"):
        if failure.exitcode < 0:
            message = f"error: worker {rank} was killed by {failure.signal_name()}; its output is above"
        else:
            message = f"error: worker {rank} exited with code {failure.exitcode}; its output is above"
    code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return code, message.splitlines()[0]


def main(argv=None) -> int:
    from . import started
    started()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        code, line = first_error(e)
        print(line, file=sys.stderr, flush=True)
        return code
    except (KeyboardInterrupt, SignalException) as e:
        sig = getattr(e, "sigval", None)
        print(f"interrupted ({getattr(sig, 'name', 'SIGINT')}); the workers were stopped — resume with "
              "--resume latest", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
