"""Triton kernels for RandSAC's skip memory, Z_l = sum_k W[l, k] H_k.

The op is memory-bound (Lenc, Ldec ~ 12, 8 flops per byte), so the schedule is about bytes: each
encoder state H_k is its own contiguous [M] tensor (M = B*N*D; the kernels take a tuple of Lenc
pointers, so the states are never stacked into one copy) and each program owns a block of M
columns for *all* decoder layers, so every H_k is read once and every Z_l written once.
Backward likewise reads dZ and H once and writes dH once; dW is accumulated per program in
registers and written to a [programs, LD, LK] buffer that the caller sums in a fixed order
(deterministic, no atomics).
"""
try:
    import triton
    import triton.language as tl
except ImportError as e:  # the dispatcher turns this into BackendUnavailable
    raise ImportError("the 'triton' backend needs the triton package: pip install triton "
                      "(or pip install 'randsac_fast[triton]')") from e

#: Elements of M per block, and the cap on backward programs (each loops over several blocks);
#: a fixed cap keeps the dW reduction order — hence its bits — independent of the GPU.
#: 256 elements on 4 warps (2 per thread): 64-96 registers on sm_90, several CTAs per SM to keep
#: loads in flight. 1024 on 8 warps held an [LD, 1024] fp32 tile and took 171-180 registers (one
#: CTA per SM) for an op that only streams memory (benchmarks/RESULTS.md, "First-contact autotuning").
BLOCK = 256
NUM_WARPS = 4
MAX_BWD_PROGRAMS = 1024


def num_blocks(m: int) -> int:
    return triton.cdiv(m, BLOCK)


@triton.jit
def skip_fwd_kernel(h_ptrs, w_ptr, z_ptr, M, LDEC, LENC: tl.constexpr, LD: tl.constexpr, BLOCK: tl.constexpr):
    """h_ptrs: LENC pointers to [M], w: [LDEC, LENC] contiguous -> z: [LDEC, M]. Grid: cdiv(M, BLOCK)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_ok = offs < M
    l = tl.arange(0, LD)
    l_ok = l < LDEC
    acc = tl.zeros((LD, BLOCK), tl.float32)
    for k in tl.static_range(LENC):         # unrolled: the Lenc loads of a block are all in flight
        h = tl.load(h_ptrs[k] + offs, mask=m_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + l * LENC + k, mask=l_ok, other=0.0).to(tl.float32)
        acc += w[:, None] * h[None, :]
    tl.store(z_ptr + l.to(tl.int64)[:, None] * M + offs[None, :], acc.to(z_ptr.dtype.element_ty),
             mask=l_ok[:, None] & m_ok[None, :])


@triton.jit(do_not_specialize=["n_blocks"])   # a loop bound: no new compile per length
def skip_bwd_kernel(dz_ptr, h_ptrs, w_ptr, dh_ptrs, dw_part_ptr, M, LDEC, n_blocks, LENC: tl.constexpr,
                    LD: tl.constexpr, LK: tl.constexpr, BLOCK: tl.constexpr):
    """dh[k] = sum_l w[l, k] dz[l] (dh_ptrs: LENC pointers to [M]);  dw_part[pid, l, k] = sum over this program's blocks of
    <dz[l], h[k]>. Grid: min(n_blocks, MAX_BWD_PROGRAMS); program pid takes blocks pid, pid+G, ..."""
    pid = tl.program_id(0)
    l = tl.arange(0, LD)
    l_ok = l < LDEC
    kk = tl.arange(0, LK)
    dw = tl.zeros((LD, LK), tl.float32)
    for blk in range(pid, n_blocks, tl.num_programs(0)):
        offs = tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m_ok = offs < M
        dz = tl.load(dz_ptr + l.to(tl.int64)[:, None] * M + offs[None, :],
                     mask=l_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)    # [LD, BLOCK]
        for k in tl.static_range(LENC):
            w = tl.load(w_ptr + l * LENC + k, mask=l_ok, other=0.0).to(tl.float32)  # W[:, k]
            dh = tl.sum(w[:, None] * dz, axis=0)
            tl.store(dh_ptrs[k] + offs, dh.to(dh_ptrs[k].dtype.element_ty), mask=m_ok)
            h = tl.load(h_ptrs[k] + offs, mask=m_ok, other=0.0).to(tl.float32)
            dw += tl.where(kk[None, :] == k, tl.sum(dz * h[None, :], axis=1)[:, None], 0.0)
    tl.store(dw_part_ptr + pid * (LD * LK) + l[:, None] * LK + kk[None, :], dw)


from .compile_log import instrument as _instrument  # noqa: E402

_instrument(globals())   # RANDSAC_FAST_COMPILE_LOG: record the compile key of every launch
