"""benchmarks/gpu_suite.sh --dry-run: every step of the one GPU call rehearsed on the CPU.

The rehearsal runs the same scripts with the same flags (Triton interpreter, smoke shapes, tiny
training, tests collected only, the build resolved by pip without compiling), so a typo in the
suite or a broken benchmark fails here rather than on a leased GPU.
"""
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def test_unknown_argument_is_named():
    proc = subprocess.run(["bash", str(SUITE), "--dryrun"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument '--dryrun'; use --dry-run" in proc.stderr


def test_dry_run_rehearses_every_step(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", str(SUITE), "--dry-run"], capture_output=True, text=True, timeout=1200,
                          cwd=ROOT, env=env)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    summary = (tmp_path / "suite_summary.txt").read_text()
    for step in ("info", "build", "tests", "attention", "targets", "skip_memory", "train"):
        assert f"  {step}: ok (" in summary, (step, summary)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["selfcheck"] and all(v["status"] == "ok" for v in info["selfcheck"]), info["selfcheck"]
    for prefix in ("attention", "targets", "skip_memory", "train"):
        assert list(tmp_path.glob(f"{prefix}_*.json")), prefix
    assert "collected" in (tmp_path / "pytest.txt").read_text()
    assert summary.rstrip().splitlines()[-1].strip()          # the table is the last thing printed
    # the compile budget: every step's Triton compiles counted on the CPU, times a measured cost
    budget = json.loads((tmp_path / "compile_budget.json").read_text())
    steps = {r["step"]: r for r in budget["rows"]}
    assert set(steps) == {"info", "tests", "attention", "targets", "skip_memory", "train"}, steps
    assert steps["info"]["compiles"] > 0 and steps["tests"]["compiles"] > 0, steps
    assert 0 < budget["estimate_s"] <= 480, budget
    assert f"compile count: {budget['compiles']}; compile time estimate:" in proc.stdout
    assert "compile count:" in summary
    for prefix in ("attention", "targets", "skip_memory"):   # written row by row, final file not partial
        assert "partial" not in json.loads(sorted(tmp_path.glob(f"{prefix}_*.json"))[-1].read_text()), prefix
