"""Components of a distributed run, shared by the trainer and the evaluations.

- :mod:`.parallel` — process group (NCCL / gloo), FSDP2 sharding, activation checkpointing, compile;
- :mod:`.checkpoint` — DCP checkpoints: atomic writes, pruning, exact-resume RNG state;
- :mod:`.metrics` — metrics.jsonl / TensorBoard logging, FLOP counting and MFU;
- :mod:`.schedule` — learning-rate scaling, warmup and cosine decay;
- :mod:`.summary` — how every command ends: one error line, or a summary with the next commands.
"""
