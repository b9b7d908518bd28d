"""The digits demo as a user runs it: the README command per (world size, seed), timed, probed.

``python benchmarks/bench_demo.py --world-sizes 1,2 --seeds 0,1,2 [--out benchmarks/results]``
runs ``python -m randsac_fast.train`` (1 process) or ``torchrun --nproc_per_node=N -m
randsac_fast.train`` with ``--seed S`` and records, per run: exit code, wall / user / system seconds
(of the whole process tree), the 1-minute load average before and after (the CPUs may be shared),
and the three probe accuracies from the run's ``probe.json``. Writes ``digits_demo.json`` and prints
a table. Extra arguments are passed to the trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import provenance  # noqa: E402


def run_once(world: int, seed: int, out: str, extra: list[str]) -> dict:
    launch = ([sys.executable, "-m", "randsac_fast.train"] if world == 1 else
              [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "-m", "randsac_fast.train"])
    cmd = [*launch, "--seed", str(seed), "--out", out, *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_start, start = os.getloadavg()[0], time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shown = " ".join(cmd[1:]).replace(os.path.dirname(out) + os.sep, "RUN_DIR/")   # no machine paths in results
    rec = {"world_size": world, "seed": seed, "command": shown, "rc": proc.returncode,
           "wall_s": round(wall, 1), "user_s": round(after.ru_utime - before.ru_utime, 1),
           "sys_s": round(after.ru_stime - before.ru_stime, 1), "load_1min_start": load_start,
           "load_1min_end": os.getloadavg()[0], "aborted": "terminate called" in proc.stderr}
    path = os.path.join(out, "probe.json")
    if os.path.exists(path):
        with open(path) as fh:
            probe = json.load(fh)
        rec.update({k: probe[k] for k in ("pretrained", "random_init", "raw_pixels")})
    else:
        rec["stderr_tail"] = proc.stderr[-2000:]
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args, extra = p.parse_known_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in map(int, args.world_sizes.split(",")):
            for seed in map(int, args.seeds.split(",")):
                rec = run_once(world, seed, os.path.join(tmp, f"w{world}_s{seed}"), extra)
                runs.append(rec)
                print(f"world {world} seed {seed}: rc {rec['rc']} wall {rec['wall_s']:.0f} s "
                      f"(cpu {rec['user_s'] + rec['sys_s']:.0f} s, load {rec['load_1min_start']:.1f}) "
                      f"pre-trained {rec.get('pretrained', float('nan')):.4f} random-init "
                      f"{rec.get('random_init', float('nan')):.4f} raw {rec.get('raw_pixels', float('nan')):.4f}",
                      flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "digits_demo.json"), "w") as fh:
        meta = provenance(torch.device("cpu"), "cpu: the README's demo command, wall time on the CPUs given")
        json.dump({"provenance": meta, "cpus": os.cpu_count(), "extra_args": extra, "runs": runs}, fh, indent=2)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
