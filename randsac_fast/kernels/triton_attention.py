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

# triton.jit decides between compiling and interpreting when a kernel is defined, i.e. at import:
# read the same switch here so that the autotune configs match the kind of kernel defined below.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: the largest head dim the kernels take (one [BLOCK, D] tile of q, k, v each lives in registers).
MAX_HEAD_DIM = 128


def _configs(blocks, warps=(4, 8), stages=(2, 3)):
    """Autotune space (H100 / H200); one small config under the interpreter, where tuning is too slow."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn in blocks for w in warps for s in stages]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (short sequences) and register-heavy ones at D=128."""
    args = {**named_args, **kwargs}   # constexprs arrive as keyword arguments
    n_q, n_k, d = args["N_Q"], args["N_K"], args["HEAD_DIM"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(n_q))
            and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n_k))
            and not (d > 64 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64 and c.num_warps < 8)]
    return keep or configs[:1]


_TUNE_KEY = ["N_Q", "N_K", "HEAD_DIM"]
_FWD_CONFIGS = _configs([(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)])
_BWD_CONFIGS = _configs([(32, 64), (64, 64), (64, 128), (128, 64), (32, 128)])
_DQ_CONFIGS = _configs([(64, 32), (64, 64), (128, 32), (128, 64)])


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


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
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

    # Segment logic lives in the loop bounds: kv_len is non-decreasing, so the tile's last row
    # ends the loop and every key below the first row's kv_len is visible to all rows (no mask).
    # kv_len is precomputed (visible_bounds): one search per query, not one per (head, tile).
    kv_end = tl.load(kv_row + tl.minimum(m0 + BLOCK_M, N_Q) - 1)
    full_end = (tl.load(kv_row + m0) // BLOCK_N) * BLOCK_N

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
@triton.jit
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


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
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

    # The queries that see key j are the suffix [q_start[j], Nq), q_start non-decreasing: start
    # at the tile of the first key's q_start; from the first tile at or past the last key's
    # q_start on, every row sees every key of this tile (no mask). Keys nobody sees skip the loop.
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


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
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

    # Same bounds as the forward: unmasked below the first row's kv_len, masked up to the last row's.
    kv_end = tl.load(kv_row + tl.minimum(m0 + BLOCK_M, N_Q) - 1)
    full_end = (tl.load(kv_row + m0) // BLOCK_N) * BLOCK_N
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


def visible_bounds(seg_q: torch.Tensor, seg_k: torch.Tensor, inclusive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_len [B, Nq] and q_start [B, Nk], int32, from sorted seg ids (two batched binary searches).

    Computed once per call outside the kernels: O(B*N log N) int32 work shared by all heads and
    by the three kernels, which then need only scalar loads for their loop bounds.
    """
    seg_q, seg_k = seg_q.contiguous(), seg_k.contiguous()
    kv_len = torch.searchsorted(seg_k, seg_q, right=inclusive, out_int32=True)
    q_start = torch.searchsorted(seg_q, seg_k, right=not inclusive, out_int32=True)
    return kv_len, q_start


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch for matmuls (off by default: exact fp32 products)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def forward(q, k, v, kv_len, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, H, Nq, D] (q's dtype, contiguous) and lse [B, H, Nq] fp32 (base 2, scaled scores)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    o = q.new_empty(q.shape)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if Nk == 0:   # nothing to see: the "query that sees no key" rule for every row
        return o.zero_(), lse.fill_(float("inf"))

    def grid(meta):
        return triton.cdiv(Nq, meta["BLOCK_M"]), B * H

    _fwd_kernel[grid](q, k, v, o, lse, kv_len, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                      H, Nq, Nk, scale * _LOG2E,
                      HEAD_DIM=D, BLOCK_D=_block_d(D), DOT_PRECISION=_dot_precision(q.dtype))
    return o, lse


def backward(do, q, k, v, o, lse, kv_len, q_start, scale: float):
    """dq, dk, dv (contiguous, in q's dtype), deterministic: every output element has one writer."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if do.stride(-1) != 1:   # autograd may hand an expanded / transposed gradient
        do = do.contiguous()
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    block_d, precision = _block_d(D), _dot_precision(q.dtype)
    block_rows = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(Nq, block_rows), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, Nq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_rows)

    def grid_k(meta):
        return triton.cdiv(Nk, meta["BLOCK_N"]), B * H

    def grid_q(meta):
        return triton.cdiv(Nq, meta["BLOCK_M"]), B * H

    common = dict(HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=precision)
    _bwd_dkdv_kernel[grid_k](q, k, v, do, lse, delta, kv_len, q_start, dk, dv,
                             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                             *dk.stride()[:3], *dv.stride()[:3], H, Nq, Nk, scale, scale * _LOG2E, **common)
    _bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, kv_len, dq,
                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                           *dq.stride()[:3], H, Nq, Nk, scale, scale * _LOG2E, **common)
    return dq, dk, dv
