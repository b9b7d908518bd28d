"""benchmarks/step_profile.py's Triton stand-in counts what the real kernels' step dispatches."""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():      # the Triton kernels under the interpreter (see test_attention_triton)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_profile  # noqa: E402   (part of this repository: an import error is a failure, not a skip)

TINY = {  # name: (model, overrides, order spec), as step_profile.CONFIGS
    "tiny RandSAC square:4": ("randsac_vit_tiny", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                                       decoder_depth=1, skip_memory=True), "square:4"),
    "tiny SAIM random": ("saim_vit_tiny", dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                              query_depth=1, blur_kernel=3), "random"),
}
COUNTS = ("total_aten", "kernel_ops", "launches", "triton_launches", "fwd_custom", "bwd_custom", "searchsorted",
          "host_syncs", "inner_aten", "kernel_ops_by_name")


@pytest.mark.parametrize("name", list(TINY))
def test_stand_in_counts_equal_the_interpreted_kernels(name, monkeypatch):
    pytest.importorskip("triton", reason="needs triton (pip install '.[triton]')")
    monkeypatch.setattr(step_profile, "CONFIGS", TINY)
    real = step_profile.profile(name, "triton", 2, False, warmup=2, count_shapes=False)
    stand_in = step_profile.profile(name, "triton", 2, False, warmup=2, count_shapes=False, stand_in=True)
    assert real["kernels"] == "run" and stand_in["kernels"].startswith("stand-in")
    assert real["triton_launches"] > 0 and real["host_syncs"] == 0
    for key in COUNTS:
        assert stand_in[key] == real[key], key
    # views and allocations are not kernels; the launches are the computing ops plus the Triton ones
    assert real["kernel_ops"] < real["total_aten"]
    assert real["launches"] == real["kernel_ops"] + real["inner_kernel_ops"] + real["triton_launches"]
