"""benchmarks/bench_train.py: the tiny configuration runs end to end and writes every row."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


def _run(out: Path, *flags: str) -> dict:
    # A subprocess: the script sets process-wide state (thread count, dynamo caches, op checks).
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--warmup", "1",
                           "--profile-steps", "1", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("train_*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_tiny_cpu_run_writes_every_row(tmp_path):
    result = _run(tmp_path, "--device", "cpu", "--model", "all")
    for key in ("device", "torch", "triton", "cuda", "git_commit", "date", "batch", "shapes"):
        assert key in result, key
    rows = {r["config"]: r for r in result["rows"]}
    expected = {f"{m}/{impl}{suffix}" for m in ("randsac", "saim", "aim")
                for impl, suffix in (("dense", ""), ("reference", ""), ("sdpa", ""), ("dense", "+compile:function"),
                                     ("reference", "+compile:block"), ("sdpa", "+compile:block"))}
    assert set(rows) == expected
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r["reason"])
        assert r["img_s"] > 0 and len(r["step_ms_all"]) == 2, name
        assert r["train_tflop_per_step"] > 0, name
    # Every row trains the same weights on the same images and orders, so (in fp32) they end at the
    # same loss up to rounding; a wrong mask or order in any row would move it by far more.
    for model in ("randsac", "saim", "aim"):
        losses = [r["loss"] for r in rows.values() if r["model"] == model]
        assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), (model, losses)
        assert rows[f"{model}/dense"]["x_dense"] == 1.0
    assert any(r["graphs"] >= 1 for name, r in rows.items() if "compile" in name)   # compiled rows compiled
    assert result["profile"]["top"], result["profile"]


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bad_backend_names_the_value(capsys):
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--device", "cpu", "--backends", "dense,tritn"])
    assert "unknown backend 'tritn'" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_gpu_run_every_backend(tmp_path):
    result = _run(tmp_path, "--device", "cuda", "--no-compile", "--backends", "dense,sdpa,flex,triton,cuda")
    rows = {r["impl"]: r for r in result["rows"] if r["model"] == "randsac"}
    assert set(rows) == {"dense", "sdpa", "flex", "triton", "cuda"}
    for impl in ("dense", "sdpa", "triton"):
        assert rows[impl]["status"] == "ok" and rows[impl]["img_s"] > 0, rows[impl]
    for impl in ("flex", "cuda"):    # the extension may not be built: then it must say so, not crash
        assert rows[impl]["status"] in ("ok", "unavailable"), rows[impl]
    assert all(r["peak_mem_gib"] > 0 for r in result["rows"] if r["status"] == "ok")
