"""Components of a distributed run, shared by the trainer and the evaluations.

- :mod:`.parallel` — process group (NCCL / gloo), FSDP2 sharding, activation checkpointing, compile;
- :mod:`.checkpoint` — DCP checkpoints: verified (sizes + sha256), atomic, never of a non-finite
  state, branches when resuming from the past, pruning, exact-resume RNG state;
- :mod:`.lock` — one run per directory;
- :mod:`.preempt` — SIGTERM / SIGINT / SIGUSR1: all ranks finish the step, save, exit with code 75;
- :mod:`.resume_config` — a resume's config against the checkpoint's (shape changes refused);
- :mod:`.metrics` — metrics.jsonl / TensorBoard logging, FLOP counting and MFU;
- :mod:`.schedule` — learning-rate scaling, warmup and cosine decay;
- :mod:`.summary` — how every command ends: one error line, or a summary with the next commands.
"""
