"""The README quotes what the commands print: the quick start's probe line against the committed
results file of that command, the own-images section's start-up lines against the trainer's."""
from __future__ import annotations

import io
import json
import os
import re
from contextlib import redirect_stdout

from randsac_fast import config
from randsac_fast.runtime.summary import pretrain_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as fh:
        return fh.read()


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_quick_start_probe_line_is_the_committed_runs():
    quick = _section(_readme(), "Quick start")
    name = re.search(r"benchmarks/results/(readme_quickstart_\w+\.json)", quick).group(1)
    with open(os.path.join(ROOT, "benchmarks", "results", name)) as fh:
        runs = json.load(fh)["runs"]
    run = next(r for r in runs if (r["world_size"], r["seed"], r["rc"]) == (2, 0, 0))
    assert "torch.distributed.run --nproc_per_node=2 -m randsac_fast.train" in run["command"]
    probe = {**{k: run[k] for k in ("pretrained", "random_init", "raw_pixels")}, "path": "runs/digits/probe.json"}
    with redirect_stdout(io.StringIO()) as out:                  # the summary as the trainer prints it
        pretrain_summary("runs/digits", None, "digits", probe)
    printed = [l for l in out.getvalue().splitlines() if l.startswith(("  result ", "  result file"))]
    assert len(printed) == 2 and all(line in quick.splitlines() for line in printed), printed


def test_own_images_section_quotes_the_trainers_start_up_lines():
    section = _section(_readme(), "Your own images")
    quoted = [l for l in section.splitlines() if l.startswith(("--data photos", "--model saim_vit_tiny"))]
    assert len(quoted) == 2
    assert config.parse_args(["--data", "photos"]).notes == [quoted[0]]
    assert config.parse_args(["--data", "photos", "--model", "saim_vit_tiny"]).notes == quoted
