"""Triton kernels for the regression targets: Gaussian blur -> patchify -> norm-pix, fused.

One program forms one target row: the patch of image ``b`` at raster token ``perm[b, i]``. It
loads the patch plus a halo of ``k // 2`` pixels (zero outside the image), blurs it separably as
two small matrix products with the banded Toeplitz matrix of the 1-D Gaussian taps
(``G_v @ X @ G_h^T``), normalises it in registers and writes it in (p, q, c) order. The loss
kernels reuse the same tile and never write a target tensor.

Tile layout (all fp32): rows ``(p, c)`` and columns ``q`` of a ``[BP*BC, BP]`` tile, so that every
channel of the patch is in registers at once (norm-pix needs the mean and variance over all
P*P*C values). BP >= 16 and BR >= 16 because ``tl.dot`` needs every dimension >= 16.
"""
try:
    import triton
    import triton.language as tl
except ImportError as e:  # the dispatcher turns this into BackendUnavailable
    raise ImportError("the 'triton' backend needs the triton package: pip install triton "
                      "(or pip install 'randsac_fast[triton]')") from e


def block_sizes(patch_size: int, channels: int, blur_kernel: int) -> tuple[int, int, int]:
    """(BP, BC, BR): padded patch side, channel count and halo'd side (powers of two)."""
    bp = max(16, triton.next_power_of_2(patch_size))
    bc = triton.next_power_of_2(channels)
    br = max(16, triton.next_power_of_2(patch_size + 2 * (blur_kernel // 2))) if blur_kernel > 1 else 16
    return bp, bc, br


@triton.jit
def _target_tile(img_ptr, taps_ptr, b, token, C, H, W, grid_w, s_b, s_c, s_h, s_w, eps,
                 P: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                 BP: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr):
    """Target of one patch: (tile [BP*BC, BP] fp32 with rows (p, c), cols q; offsets of each
    element inside the P*P*C target row; validity mask)."""
    y0 = (token // grid_w) * P
    x0 = (token % grid_w) * P
    base = img_ptr + b * s_b
    rows = tl.arange(0, BP * BC)
    p = rows // BC
    c = rows % BC
    q = tl.arange(0, BP)
    mask = ((p < P) & (c < C))[:, None] & (q < P)[None, :]
    if K > 1:
        R: tl.constexpr = K // 2
        # X [BR, BC*BR]: image rows y0-R+i, columns (c, x0-R+x); zeros outside the image are
        # SAIM's zero padding, zeros beyond the halo are tile padding.
        i = tl.arange(0, BR)
        cx = tl.arange(0, BC * BR)
        cc = cx // BR
        xx = cx % BR
        y = y0 - R + i
        x = x0 - R + xx
        row_ok = (i < P + 2 * R) & (y >= 0) & (y < H)
        col_ok = (xx < P + 2 * R) & (cc < C) & (x >= 0) & (x < W)
        X = tl.load(base + y[:, None] * s_h + (cc * s_c + x * s_w)[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        # Vertical pass: G_v[p, i] = g[i - p], the banded Toeplitz matrix of the taps.
        dv = i[None, :] - tl.arange(0, BP)[:, None]
        g_v = tl.load(taps_ptr + dv, mask=(dv >= 0) & (dv < K), other=0.0)          # [BP, BR]
        V = tl.dot(g_v, X, input_precision="ieee")                                   # [BP, BC*BR]
        V = tl.reshape(V, (BP * BC, BR))                                             # rows (p, c)
        # Horizontal pass: G_h^T[x, q] = g[x - q].
        dh = i[:, None] - q[None, :]
        g_h = tl.load(taps_ptr + dh, mask=(dh >= 0) & (dh < K), other=0.0)          # [BR, BP]
        t = tl.dot(V, g_h, input_precision="ieee")                                   # [BP*BC, BP]
    else:
        t = tl.load(base + (c * s_c + (y0 + p) * s_h)[:, None] + ((x0 + q) * s_w)[None, :],
                    mask=mask, other=0.0).to(tl.float32)
    if NORM:
        # MAE norm-pix, two passes over the tile in registers: unbiased var + eps.
        n = P * P * C
        t = tl.where(mask, t, 0.0)
        mean = tl.sum(tl.sum(t, axis=1), axis=0) / n
        diff = tl.where(mask, t - mean, 0.0)
        var = tl.sum(tl.sum(diff * diff, axis=1), axis=0) / (n - 1)
        t = diff / tl.sqrt_rn(var + eps)
    offs = (p * (P * C) + c)[:, None] + (q * C)[None, :]
    return t, offs, mask


@triton.jit
def patch_targets_kernel(img_ptr, perm_ptr, taps_ptr, out_ptr, n_rows, C, H, W, grid_w,
                         s_b, s_c, s_h, s_w, eps,
                         P: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, HAS_PERM: tl.constexpr,
                         BP: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr):
    """out[b, i, :] = target of token perm[b, i] (or i). Grid: (N', B)."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    if HAS_PERM:
        token = tl.load(perm_ptr + b * n_rows + i)
    else:
        token = i
    t, offs, mask = _target_tile(img_ptr, taps_ptr, b, token, C, H, W, grid_w, s_b, s_c, s_h, s_w, eps,
                                 P, K, NORM, BP, BC, BR)
    tl.store(out_ptr + (b * n_rows + i) * (P * P * C) + offs, t, mask=mask)


@triton.jit
def patch_loss_fwd_kernel(pred_ptr, img_ptr, perm_ptr, valid_ptr, taps_ptr, row_err_ptr, n_rows,
                          C, H, W, grid_w, s_b, s_c, s_h, s_w, eps,
                          P: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, L1: tl.constexpr,
                          HAS_VALID: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr):
    """row_err[b, i] = sum over the row of (pred - target)^2 (or |.|); 0 for invalid rows.

    pred: contiguous [B, N', P*P*C]. Grid: (N', B). The scalar mean is one small torch reduction
    over row_err afterwards (deterministic, no atomics).
    """
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * n_rows + i
    token = tl.load(perm_ptr + row)
    t, offs, mask = _target_tile(img_ptr, taps_ptr, b, token, C, H, W, grid_w, s_b, s_c, s_h, s_w, eps,
                                 P, K, NORM, BP, BC, BR)
    pred = tl.load(pred_ptr + row * (P * P * C) + offs, mask=mask, other=0.0).to(tl.float32)
    diff = tl.where(mask, pred - t, 0.0)
    err = tl.abs(diff) if L1 else diff * diff
    total = tl.sum(tl.sum(err, axis=1), axis=0)
    if HAS_VALID:
        # where, not a product: padding rows may hold anything (even NaN) and must add nothing.
        total = tl.where(tl.load(valid_ptr + row) != 0, total, 0.0)
    tl.store(row_err_ptr + row, total)


@triton.jit
def patch_loss_bwd_kernel(pred_ptr, img_ptr, perm_ptr, valid_ptr, taps_ptr, coef_ptr, dpred_ptr, n_rows,
                          C, H, W, grid_w, s_b, s_c, s_h, s_w, eps,
                          P: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, L1: tl.constexpr,
                          HAS_VALID: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr):
    """dpred[b, i] = coef * d err / d pred (2 diff or sign(diff)), 0 on invalid rows; the target is
    formed again here rather than kept from the forward. coef = dloss / (n_valid * P*P*C)."""
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * n_rows + i
    token = tl.load(perm_ptr + row)
    t, offs, mask = _target_tile(img_ptr, taps_ptr, b, token, C, H, W, grid_w, s_b, s_c, s_h, s_w, eps,
                                 P, K, NORM, BP, BC, BR)
    ptrs = row * (P * P * C) + offs
    diff = tl.load(pred_ptr + ptrs, mask=mask, other=0.0).to(tl.float32) - t
    if L1:
        d = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        d = 2.0 * diff
    d = d * tl.load(coef_ptr)
    if HAS_VALID:
        d = tl.where(tl.load(valid_ptr + row) != 0, d, 0.0)
    tl.store(dpred_ptr + ptrs, d.to(dpred_ptr.dtype.element_ty), mask=mask)


from .compile_log import instrument as _instrument  # noqa: E402

_instrument(globals())   # RANDSAC_FAST_COMPILE_LOG: record the compile key of every launch
