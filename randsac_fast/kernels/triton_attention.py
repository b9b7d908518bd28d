"""Triton kernels: block-sparse segment-causal ("staircase") attention, forward and backward.

The mask is never materialised. Because every seg row is sorted, query i sees exactly the key
prefix [0, kv_len[i]) and key j is seen by exactly the query suffix [q_start[j], Nq):

    kv_len[i]  = #{j : seg_k[j] <= seg_q[i]}   (inclusive)   or  < (strict)
    q_start[j] = min{i : kv_len[i] > j}

Both are non-decreasing, so for a tile of rows the loop bounds follow from two scalar loads:
tiles entirely inside every row's prefix run without masking arithmetic, and only the one or two
tiles that straddle a segment boundary compare ``offs < kv_len``. The rest of the schedule is
FlashAttention-2's: online softmax with fp32 accumulators in the forward (saving the logsumexp),
and a deterministic backward with no atomics: delta = rowsum(dO * O), then dK/dV by key tiles and
dQ by query tiles in two separate kernels.

Layouts: q, o, do, dq: [B, H, Nq, D]; k, v, dk, dv: [B, H, Nk, D], any strides with a contiguous
last dim; lse, delta: [B, H, Nq] fp32 (base-2 logsumexp of the scaled scores; +inf for a query
that sees no key); kv_len: [B, Nq] int32; q_start: [B, Nk] int32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .tiles import Tile

# triton.jit decides between compiling and interpreting when a kernel is defined, i.e. at import:
# read the same switch here so that the tiles match the kind of kernel defined below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: the largest head dim the kernels take (one [BLOCK, D] tile of q, k, v each lives in registers).
MAX_HEAD_DIM = 128


# Tiles. A launcher asks randsac_fast.ops.autotune.choose_tile for its (BLOCK_M, BLOCK_N, warps,
# stages): by default the pinned tile below (one compile per kernel variant, the same tile on every
# rank); with RANDSAC_FAST_TILES=sweep the fastest candidate per bucketed key. Candidates are the
# space below minus the tiles that spill registers on sm_90 (``python -m
# randsac_fast.kernels.compile_check --full`` prints registers and spills of each). Sequence lengths
# and the head count are not specialised on (``do_not_specialize``): a new length is neither a new
# compile nor a new tuning.
_SPACE = {
    "fwd": [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)],
    "dkdv": [(32, 64), (64, 64), (64, 128), (128, 64), (32, 128)],    # (BLOCK_M queries, BLOCK_N keys)
    "dq": [(64, 32), (64, 64), (128, 32), (128, 64)],
}
_UNSPECIALISED = ["H", "N_Q", "N_K"]
_INTERPRETER_TILE = Tile(16, 16, 1, 1)   # the interpreter runs one program at a time: small and fast

# Known-good sm_90 tiles per (kernel, head dims up to 64 / 128, half precision / fp32): no spills
# at any head dim of the class (compile_check), registers low enough for >= 2 CTAs per SM where
# the tile allows it. See benchmarks/RESULTS.md, "First-contact autotuning".
PINNED = {
    ("fwd", 64, "half"): Tile(128, 64, 4, 3),
    ("fwd", 128, "half"): Tile(128, 64, 8, 3),
    ("fwd", 64, "fp32"): Tile(32, 64, 8, 2),
    ("fwd", 128, "fp32"): Tile(32, 64, 8, 2),
    ("dkdv", 64, "half"): Tile(64, 64, 4, 2),
    ("dkdv", 128, "half"): Tile(64, 64, 8, 2),
    ("dkdv", 64, "fp32"): Tile(32, 16, 8, 2),
    ("dkdv", 128, "fp32"): Tile(32, 16, 8, 2),
    ("dq", 64, "half"): Tile(64, 64, 4, 2),
    ("dq", 128, "half"): Tile(64, 64, 8, 2),
    ("dq", 64, "fp32"): Tile(32, 64, 8, 2),
    ("dq", 128, "fp32"): Tile(32, 64, 8, 2),
}


def _classes(head_dim: int, dtype) -> tuple[int, str]:
    dtype_class = "fp32" if dtype in (torch.float32, "fp32") else "half"
    return (64 if head_dim <= 64 else 128), dtype_class


def register_heavy(kernel: str, tile: Tile, head_dim: int, dtype=torch.bfloat16) -> bool:
    """Tiles that spill registers on sm_90 (or sit at the 255-register cap): never worth a compile.

    The estimate is the fp32 values a thread keeps live in the loop: accumulators ([BM, D] or two
    [BN, D]) plus the score tiles ([BM, BN]: one in the forward, two in each backward kernel),
    over the threads of the CTA; compile_check calibrates the threshold (at 4 warps, 128 values
    per thread already compile to 234-252 registers; above that they spill).
    """
    d = max(16, triton.next_power_of_2(head_dim))
    bm, bn, threads = tile.block_m, tile.block_n, 32 * tile.num_warps
    if kernel == "fwd":
        live = bm * d + bm * bn
    elif kernel == "dkdv":
        live = 2 * bn * d + 2 * bm * bn
    else:
        live = bm * d + 2 * bm * bn
    limit = 96 if _classes(head_dim, dtype)[1] == "fp32" else 128
    # dK/dV holds its two score tiles transposed ([BN, BM]) next to the q and dO tiles it reloads
    # every step: with 128 query rows it spills at 4 and at 8 warps (compile_check, D = 64 and 128).
    return live / threads > limit or (kernel == "dkdv" and bm > 64)


def candidates(kernel: str, head_dim: int, dtype=torch.bfloat16) -> list[Tile]:
    """What a sweep times: the space minus the register-heavy tiles."""
    space = [Tile(bm, bn, w, s) for bm, bn in _SPACE[kernel] for w in (4, 8) for s in (2, 3)]
    kept = [t for t in space if not register_heavy(kernel, t, head_dim, dtype)]
    return list(dict.fromkeys([pinned(kernel, head_dim, dtype), *kept]))   # the pinned tile always competes


def pinned(kernel: str, head_dim: int, dtype) -> Tile:
    """The known-good tile of a kernel for a head dim and dtype (see PINNED)."""
    return PINNED[(kernel, *_classes(head_dim, dtype))]


#: ``randsac_fast.ops.autotune.choose_tile``, set when the ops layer loads these kernels (the kernels
#: do not import the dispatch layer above them).
TILE_CHOOSER = None


def _tile(kernel: str, q: torch.Tensor, n_q: int, n_k: int, launch) -> Tile:
    """The tile to launch ``kernel`` with; ``launch(tile)`` runs it (timed only by a sweep)."""
    if INTERPRET:
        return _INTERPRETER_TILE
    head_dim = q.shape[-1]
    if TILE_CHOOSER is None:           # launched without the ops layer: the pinned tile
        return pinned(kernel, head_dim, q.dtype)

    def bench(tile: Tile) -> float:
        return triton.testing.do_bench(lambda: launch(tile), warmup=5, rep=20)

    return TILE_CHOOSER(kernel, q.device, q.dtype, head_dim, n_q, n_k, [pinned(kernel, head_dim, q.dtype)],
                                candidates(kernel, head_dim, q.dtype), bench)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """A [rows, BLOCK_D] tile, bounds-checked only where needed: boundary tiles, a padded head dim."""
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _fwd_tile(q, k_ptrs, v_ptrs, start_n, N_K, kv_len, m_i, l_i, acc, offs_n, offs_d, stride_kn, stride_vn,
              scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
              MASKED: tl.constexpr):
    """One key tile of the online softmax. MASKED: the tile straddles some row's kv_len."""
    cols = start_n + offs_n
    # Unmasked tiles lie below some row's kv_len <= N_K; only a boundary tile can run past N_K.
    # A boundary tile loads the keys no row of the tile sees (padding) as 0: they may hold NaN,
    # and a masked p of 0 times a NaN v would still be NaN.
    k_end = tl.max(kv_len, 0) if MASKED else N_K
    k = _load_rows(k_ptrs + cols[:, None] * stride_kn, cols, k_end, offs_d, HEAD_DIM, BLOCK_D, MASKED)   # [BN, D]
    v = _load_rows(v_ptrs + cols[:, None] * stride_vn, cols, k_end, offs_d, HEAD_DIM, BLOCK_D, MASKED)   # [BN, D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2                        # [BM, BN]
    if MASKED:
        s = tl.where(cols[None, :] < kv_len[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet keeps m = -inf; shift by 0 instead so that exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _fwd_kernel(Q, K, V, O, LSE, KV_LEN,
                stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                H, N_Q, N_K, scale_log2,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)          # int64: batch strides of a fused qkv view exceed 2^31
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kv_row = KV_LEN + b * N_Q
    kv_len = tl.load(kv_row + offs_m, mask=row_ok, other=0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_d[None, :]

    # Segment logic lives in the loop bounds: the tile's largest kv_len ends the loop and every
    # key below its smallest kv_len is visible to all rows (no mask). kv_len is non-decreasing
    # except that padded rows (0) may end a sample, hence max / min rather than last / first row.
    # kv_len is precomputed once per forward (SegmentBounds), not once per (head, tile).
    kv_end = tl.max(kv_len, 0)
    full_end = (tl.min(tl.where(row_ok, kv_len, N_K), 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, k_ptrs, v_ptrs, start_n, N_K, kv_len, m_i, l_i, acc, offs_n, offs_d,
                                  stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_D, DOT_PRECISION, MASKED=False)
    for start_n in range(full_end, kv_end, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, k_ptrs, v_ptrs, start_n, N_K, kv_len, m_i, l_i, acc, offs_n, offs_d,
                                  stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_D, DOT_PRECISION, MASKED=True)

    # A query that sees no key: output 0 and lse = +inf, so the backward's exp2(s - lse) is 0.
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "N_Q"])
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
                      H, N_Q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32: the softmax-backward term shared by dQ and dK."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _dkdv_tile(k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, kv_ptr, start_m, cols, dk, dv, offs_m, offs_d,
               stride_qn, stride_don, N_Q, scale_log2,
               HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One query tile's contribution to a key tile's dK, dV (scores held transposed: [BN, BM])."""
    rows = start_m + offs_m
    row_ok = rows < N_Q
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    # Rows past N_Q load q = dO = 0, lse = delta = 0: their p is finite and their dS is 0.
    q = tl.load(q_ptrs + rows[:, None] * stride_qn, mask=ok, other=0.0)                   # [BM, D]
    do = tl.load(do_ptrs + rows[:, None] * stride_don, mask=ok, other=0.0)                # [BM, D]
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2              # [BN, BM]
    pt = tl.math.exp2(st - lse[None, :])
    if MASKED:
        kv_len = tl.load(kv_ptr + rows, mask=row_ok, other=0)
        pt = tl.where(cols[:, None] < kv_len[None, :], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)                          # [BN, BM]
    dst = pt * (dpt - delta[None, :])
    if MASKED:   # select, not multiply: a hidden key's v may be NaN, and 0 * NaN is NaN
        dst = tl.where(cols[:, None] < kv_len[None, :], dst, 0.0)
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KV_LEN, Q_START, DK, DV,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     H, N_Q, N_K, scale, scale_log2,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (cols[:, None] < N_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :], mask=ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + offs_d[None, :], mask=ok, other=0.0)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_d[None, :]
    lse_ptr = LSE + pid_bh.to(tl.int64) * N_Q
    delta_ptr = DELTA + pid_bh.to(tl.int64) * N_Q
    kv_ptr = KV_LEN + b * N_Q

    # The queries that see key j are the suffix [q_start[j], Nq) (up to padded rows, whose lse is
    # +inf so they add exactly 0), q_start non-decreasing: start at the tile of the first key's
    # q_start; from the first tile at or past the last key's q_start on, every row sees every key
    # of this tile (no mask). Keys nobody sees (q_start = Nq) skip the loop.
    q_row = Q_START + b * N_K
    lo = (tl.load(q_row + n0) // BLOCK_M) * BLOCK_M
    q_full = tl.load(q_row + tl.minimum(n0 + BLOCK_N, N_K) - 1)
    full_start = tl.minimum(tl.cdiv(q_full, BLOCK_M) * BLOCK_M, N_Q)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(lo, full_start, BLOCK_M):
        dk, dv = _dkdv_tile(k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, kv_ptr, start_m, cols, dk, dv, offs_m,
                            offs_d, stride_qn, stride_don, N_Q, scale_log2, HEAD_DIM, DOT_PRECISION, MASKED=True)
    for start_m in range(full_start, N_Q, BLOCK_M):
        dk, dv = _dkdv_tile(k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, kv_ptr, start_m, cols, dk, dv, offs_m,
                            offs_d, stride_qn, stride_don, N_Q, scale_log2, HEAD_DIM, DOT_PRECISION, MASKED=False)

    tl.store(DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_tile(q, do, lse, delta, k_ptrs, v_ptrs, start_n, N_K, kv_len, dq, offs_n, offs_d, stride_kn, stride_vn,
             scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
             MASKED: tl.constexpr):
    """One key tile's contribution to a query tile's dQ."""
    cols = start_n + offs_n
    k_end = tl.max(kv_len, 0) if MASKED else N_K      # as in the forward: hidden keys load as 0
    k = _load_rows(k_ptrs + cols[:, None] * stride_kn, cols, k_end, offs_d, HEAD_DIM, BLOCK_D, MASKED)   # [BN, D]
    v = _load_rows(v_ptrs + cols[:, None] * stride_vn, cols, k_end, offs_d, HEAD_DIM, BLOCK_D, MASKED)   # [BN, D]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2            # [BM, BN]
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(cols[None, :] < kv_len[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if MASKED:
        ds = tl.where(cols[None, :] < kv_len[:, None], ds, 0.0)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_UNSPECIALISED)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, KV_LEN, DQ,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
                   stride_dqb, stride_dqh, stride_dqn,
                   H, N_Q, N_K, scale, scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q
    ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=ok, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    kv_row = KV_LEN + b * N_Q
    kv_len = tl.load(kv_row + offs_m, mask=row_ok, other=0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_d[None, :]

    # Same bounds as the forward: unmasked below the tile's smallest kv_len, masked up to its largest.
    kv_end = tl.max(kv_len, 0)
    full_end = (tl.min(tl.where(row_ok, kv_len, N_K), 0) // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(q, do, lse, delta, k_ptrs, v_ptrs, start_n, N_K, kv_len, dq, offs_n, offs_d, stride_kn, stride_vn,
                      scale_log2, HEAD_DIM, BLOCK_D, DOT_PRECISION, MASKED=False)
    for start_n in range(full_end, kv_end, BLOCK_N):
        dq = _dq_tile(q, do, lse, delta, k_ptrs, v_ptrs, start_n, N_K, kv_len, dq, offs_n, offs_d, stride_kn, stride_vn,
                      scale_log2, HEAD_DIM, BLOCK_D, DOT_PRECISION, MASKED=True)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# Launchers (no autograd here; see randsac_fast.ops.attention_triton)
# ----------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634


def kv_lengths(seg_q: torch.Tensor, seg_k: torch.Tensor, inclusive: bool) -> torch.Tensor:
    """kv_len [B, Nq] int32 from sorted seg ids (one batched binary search): all the forward needs."""
    return torch.searchsorted(seg_k.contiguous(), seg_q.contiguous(), right=inclusive, out_int32=True)


def visible_bounds(seg_q: torch.Tensor, seg_k: torch.Tensor, inclusive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_len [B, Nq] and q_start [B, Nk], int32, from sorted seg ids (two batched binary searches).

    For one call on raw seg ids; a model builds them once per forward instead
    (:func:`randsac_fast.ops.attention_bounds.segment_bounds`) and shares them across layers.
    """
    q_start = torch.searchsorted(seg_q.contiguous(), seg_k.contiguous(), right=not inclusive, out_int32=True)
    return kv_lengths(seg_q, seg_k, inclusive), q_start


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch for matmuls (off by default: exact fp32 products)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def forward(q, k, v, kv_len, scale: float, o=None) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, H, Nq, D] (q's dtype; written into ``o`` when given, any strides with a contiguous
    last dim, e.g. a [B, Nq, H, D] buffer's transposed view) and lse [B, H, Nq] fp32 (base 2)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = q.new_empty(q.shape) if o is None else o
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Nk == 0:   # nothing to see: the "query that sees no key" rule for every row
        return o.zero_(), lse.fill_(float("inf"))

    def launch(tile: Tile):
        _fwd_kernel[(triton.cdiv(Nq, tile.block_m), B * H)](
            q, k, v, o, lse, kv_len, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            H, Nq, Nk, scale * _LOG2E, HEAD_DIM=D, BLOCK_D=_block_d(D), DOT_PRECISION=_dot_precision(q.dtype),
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages)

    launch(_tile("fwd", q, Nq, Nk, launch))
    return o, lse


def backward(do, q, k, v, o, lse, kv_len, q_start, scale: float, grads=None):
    """dq, dk, dv in q's dtype (contiguous, or written into ``grads`` = (dq, dk, dv) views, e.g. of
    one dqkv buffer), deterministic: every output element has one writer."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if do.stride(-1) != 1:   # autograd may hand an expanded / transposed gradient
        do = do.contiguous()
    dq, dk, dv = grads if grads is not None else (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    block_d, precision = _block_d(D), _dot_precision(q.dtype)
    block_rows = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(Nq, block_rows), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Nq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_rows)

    common = dict(HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=precision)

    def launch_dkdv(tile: Tile):
        _bwd_dkdv_kernel[(triton.cdiv(Nk, tile.block_n), B * H)](
            q, k, v, do, lse, delta, kv_len, q_start, dk, dv,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dk.stride()[:3], *dv.stride()[:3], H, Nq, Nk, scale, scale * _LOG2E, **common,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages)

    def launch_dq(tile: Tile):
        _bwd_dq_kernel[(triton.cdiv(Nq, tile.block_m), B * H)](
            q, k, v, do, lse, delta, kv_len, dq,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], H, Nq, Nk, scale, scale * _LOG2E, **common,
            BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages)

    launch_dkdv(_tile("dkdv", q, Nq, Nk, launch_dkdv))
    launch_dq(_tile("dq", q, Nq, Nk, launch_dq))
    return dq, dk, dv


from .compile_log import instrument as _instrument  # noqa: E402

_instrument(globals())   # RANDSAC_FAST_COMPILE_LOG: record the compile key of every launch
