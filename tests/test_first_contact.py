"""First contact with a GPU: tiles pinned per kernel, keys bucketed, one tile for every rank,
register-lean skip memory. CPU only: sm_90 compiles through compile_check, gloo for the ranks."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("triton", reason="needs triton")

from randsac_fast.kernels import triton_attention as attn  # noqa: E402
from randsac_fast.ops import autotune  # noqa: E402
from randsac_fast.ops.autotune import Tile  # noqa: E402


def test_prune_drops_tiles_that_spill_on_sm90():
    # measured with compile_check (sm_90): dK/dV D=128 64x128 at 4 warps spills ~3 KB, fwd D=128
    # 128x64 at 4 warps ~450 B, dK/dV D=64 128x64 at 8 warps ~20 B
    spilling = [("dkdv", Tile(64, 128, 4, 2), 128), ("fwd", Tile(128, 64, 4, 3), 128),
                ("dkdv", Tile(128, 64, 8, 3), 64), ("fwd", Tile(128, 128, 4, 2), 64)]
    for kernel, tile, d in spilling:
        assert attn.register_heavy(kernel, tile, d), (kernel, tile, d)
        assert tile not in attn.candidates(kernel, d, torch.bfloat16), (kernel, tile, d)
    for (kernel, d, dtype_class), tile in attn.PINNED.items():
        dtype = torch.float32 if dtype_class == "fp32" else torch.bfloat16
        assert tile in attn.candidates(kernel, d, dtype)


def test_lengths_in_one_bucket_share_one_key():
    cpu = torch.device("cpu")
    a = autotune.tile_key("fwd", cpu, torch.bfloat16, 64, 150, 197)
    b = autotune.tile_key("fwd", cpu, torch.bfloat16, 64, 197, 256)
    assert a == b
    assert autotune.tile_key("fwd", cpu, torch.bfloat16, 64, 257, 197) != a
    for kernel in (attn._fwd_kernel, attn._bwd_dkdv_kernel, attn._bwd_dq_kernel):
        dns = getattr(kernel, "do_not_specialize", None) or kernel.kwargs["do_not_specialize"]
        assert {"N_Q", "N_K"} <= set(dns)     # a new length is no new compile either


def test_pinned_mode_never_times(monkeypatch):
    monkeypatch.delenv(autotune.ENV_TILES, raising=False)

    def bench(tile):
        raise AssertionError("pinned mode must not time")
    tile = autotune.choose_tile("fwd", torch.device("cpu"), torch.bfloat16, 64, 197, 197,
                                [attn.pinned("fwd", 64, torch.bfloat16)], attn.candidates("fwd", 64), bench)
    assert tile == attn.PINNED[("fwd", 64, "half")]
    monkeypatch.setenv(autotune.ENV_TILES, "fastest")
    with pytest.raises(ValueError, match="RANDSAC_FAST_TILES='fastest' is not understood"):
        autotune.tiles_mode()


def _sweep_rank(rank, world, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        os.environ[autotune.ENV_TILES] = "sweep"
        tiles = [Tile(64, 64, 4, 2), Tile(128, 64, 8, 3)]
        # each rank would time a different winner: rank 0's must be the one every rank launches
        chosen = autotune.choose_tile("fwd", torch.device("cpu"), torch.bfloat16, 64, 200, 200, tiles[:1], tiles,
                                      lambda t: float(t == tiles[rank % 2]))
        with open(f"{result_file}.{rank}", "w") as f:
            f.write(str(chosen.as_list()))
    finally:
        dist.destroy_process_group()


def test_sweep_choice_is_rank_zeros_on_every_rank(tmp_path):
    mp.start_processes(_sweep_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2,
                       start_method="spawn")
    chosen = [(tmp_path / f"out.{r}").read_text() for r in range(2)]
    assert chosen[0] == chosen[1] == str([128, 64, 8, 3]), chosen


def test_skip_memory_kernels_are_register_lean_on_sm90():
    """Memory-bound: at most 128 registers (>= 2 CTAs of 4 warps per SM) and no spills (was 171-180)."""
    sys.modules.pop("randsac_fast.kernels.compile_check", None)
    from randsac_fast.kernels import compile_check
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("the kernel modules were imported under the interpreter in this process")
    for v in compile_check._skip_variants():
        r = compile_check.compile_variant(v)
        assert r["error"] is None, r["error"]
        assert r["regs"] is not None and r["regs"] <= 128, (v.kernel, v.dtype, r)
        assert r["spills"] in (None, (0, 0)), (v.kernel, v.dtype, r)
