"""The pre-training run: ``torchrun --nproc_per_node=N -m randsac_fast.train [flags]``.

:mod:`.trainer` holds the :class:`Trainer` (the glue: config -> data -> model -> optimizer -> resume
-> loop -> probe) and ``main(argv)``; its components live in :mod:`randsac_fast.runtime`.
"""
from .trainer import Trainer, TrainingError, main, param_groups

__all__ = ["Trainer", "TrainingError", "main", "param_groups"]
