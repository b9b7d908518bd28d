"""``python -m randsac_fast.info``: every field present, real self-checks run, a readable report."""
import json
import os

import torch

if not torch.cuda.is_available():   # before triton is imported (see test_attention_triton.py)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from randsac_fast import info  # noqa: E402
from randsac_fast.ops import _dispatch, selfcheck  # noqa: E402


@pytest.fixture(scope="module")
def report_json():
    import contextlib
    import io
    _dispatch.clear_choices()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = info.main(["--json", "--quick"])
    _dispatch.clear_choices()
    return rc, json.loads(out.getvalue())


def test_json_has_every_field(report_json):
    rc, data = report_json
    assert set(data) == set(info.FIELDS)
    assert data["torch"] == torch.__version__ and data["python"]
    assert set(data["backends"]) == set(_dispatch.registered())
    for op, table in data["backends"].items():
        assert set(table) == set(_dispatch.registered()[op].table)
        assert table["reference"]["available"] is True
        assert all(b["available"] or b["detail"] for b in table.values())   # unavailable says why


def test_self_checks_ran_and_passed(report_json):
    rc, data = report_json
    checked = {(r["op"], r["backend"]) for r in data["selfcheck"]}
    if data["backends"]["segment_attention"]["triton"]["available"]:
        assert {("segment_attention", "triton"), ("patch_loss", "triton"), ("skip_memory", "triton"),
                ("patch_targets", "triton")} <= checked
    for r in data["selfcheck"]:
        assert r["status"] in ("ok", "unsupported"), r
        assert r["seconds"] > 0 and r["dtype"] and r["structure"]
        if r["status"] == "ok":
            assert all(e["fast"] <= e["bound"] for e in r["errors"].values()), r
    assert rc == 0
    assert selfcheck.mode() == "warn"             # info left the process's mode as it found it


def test_cpu_report_lists_what_needs_a_gpu(report_json):
    rc, data = report_json
    if torch.cuda.is_available():
        assert data["needs_gpu"] == [] and data["timing"] and data["auto"]
    else:
        assert data["timing"] == [] and data["auto"] == []
        assert any("bf16" in n for n in data["needs_gpu"]) and any("cuda backend" in n for n in data["needs_gpu"])
    text = info.report(data)
    assert "self-check" in text and "segment_attention" in text and f"torch {torch.__version__}" in text


def test_report_keeps_whole_sentences_and_separates_columns():
    fix = ("the extension randsac_fast._C is not built; build it with pip install -e . --no-build-isolation on a "
           "machine with nvcc and a CUDA build of torch, or set RANDSAC_FAST_JIT=1 to compile it on first use")
    data = {"randsac_fast": "0", "git_commit": None, "python": "3", "platform": "linux", "torch": "2", "cuda": None,
            "cudnn": None, "triton": None, "driver": None, "gpus": [], "device": "cpu", "env": {},
            "backends": {"segment_attention": {"reference": {"available": True, "detail": ""},
                                               "cuda": {"available": False, "detail": fix}}},
            "selfcheck": [{"op": "segment_attention", "backend": "sdpa_causal", "dtype": "float32",
                           "structure": ["64", "True", "strided-and-a-long-layout-name"], "status": "unsupported",
                           "seconds": 0.01, "errors": {}, "detail": fix}],
            "timing": [], "auto": [], "needs_gpu": [], "seconds": 1}
    text = info.report(data)
    assert text.count(fix) == 2                                  # whole, where it is needed
    row = next(l for l in text.splitlines() if "sdpa_causal" in l)
    assert "sdpa_causal  float32  64,True,strided-and-a-long-layout-name  UNSUPPORTED" in row
