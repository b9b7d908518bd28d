"""Attentive vs linear probe on trained encoders: ``python benchmarks/bench_attnprobe.py CKPT [CKPT ...]
[--out FILE.json]``.

For each checkpoint (a trainer ``step_XXXXXXXX`` directory of a digits run) the frozen encoder is
probed on digits' fixed train/test split by (a) the demo's linear probe (standardised L2 logistic
regression on the avg-pooled final tokens, :func:`randsac_fast.eval.probe.linear_probe_accuracy`)
and (b) the in-memory attentive probe (:func:`randsac_fast.eval.attnprobe.attentive_probe_accuracy`,
probe seeds 0-2), and the same two on the encoder at its random initialisation. Prints a table,
writes JSON with versions and every number.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from randsac_fast import data as data_mod
from randsac_fast import interop
from randsac_fast.eval.linprobe import norm_stats
from randsac_fast.eval.attnprobe import attentive_probe_accuracy
from randsac_fast.eval.probe import linear_probe_accuracy


def probe_all(encoder, train, test, probe_seeds) -> dict:
    start = time.perf_counter()
    linear = linear_probe_accuracy(encoder, train, test)
    linear_s = time.perf_counter() - start
    attn, attn_s = [], []
    for seed in probe_seeds:
        start = time.perf_counter()
        attn.append(attentive_probe_accuracy(encoder, train, test, seed=seed))
        attn_s.append(time.perf_counter() - start)
    return {"linear": linear, "attentive": attn, "attentive_median": statistics.median(attn),
            "linear_s": round(linear_s, 2), "attentive_s": [round(t, 2) for t in attn_s]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--probe-seeds", default="0,1,2")
    args = p.parse_args(argv)
    probe_seeds = [int(s) for s in args.probe_seeds.split(",")]
    rows = []
    for ckpt in args.ckpts:
        model, meta = interop.load_model(ckpt)
        mean, std = norm_stats(meta, data_mod.digits("train"))
        img = model.img_size[0]
        train, test = (data_mod.eval_images(data_mod.digits(s), img, mean, std) for s in ("train", "test"))
        trained = probe_all(model, train, test, probe_seeds)
        torch.manual_seed(int(meta.get("config", {}).get("train", {}).get("seed", 0)))
        fresh = type(model)(copy.deepcopy(model.config))          # the same architecture, freshly initialised
        random_init = probe_all(fresh, train, test, probe_seeds)
        rows.append({"ckpt": ckpt, "model": type(model).__name__, "pretrained": trained, "random_init": random_init})
        print(f"{ckpt}: linear {trained['linear']:.4f}, attentive {trained['attentive']} "
              f"(random init: linear {random_init['linear']:.4f}, attentive {random_init['attentive']})", flush=True)
    print("\n| checkpoint | linear probe | attentive probe (probe seeds) | attentive - linear |")
    print("|---|---|---|---|")
    for r in rows:
        t = r["pretrained"]
        print(f"| `{r['ckpt']}` | {t['linear']:.4f} | {', '.join(f'{a:.4f}' for a in t['attentive'])} "
              f"| {t['attentive_median'] - t['linear']:+.4f} |")
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "cpu_threads": torch.get_num_threads(),
              "probe_seeds": probe_seeds, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
