// Segment attention backward, FlashAttention-2 schedule, deterministic (no atomics), in two
// kernels that mirror the forward:
//
//   dkdv_kernel: one block per 64-key tile, each warp owning 16 keys; loops over the query suffix
//                that sees the tile (from q_start), Q / dO / lse / delta tiles double-buffered
//                through cp.async, and accumulates dK, dV in registers.
//   dq_kernel:   one block per 64-query tile, each warp owning 16 queries; loops over the visible
//                key prefix (as the forward does), K / V double-buffered, and accumulates dQ in
//                registers.
//
// Both recompute P = exp(scale * q . k - lse) from the forward's lse, with
// dS = P * (dP - delta), dP = dout . v, delta = rowsum(dout * out) (computed by the caller).
// Rows that see no key have lse = +inf, so P = 0 there and they add nothing.
#include "segattn_common.cuh"

namespace segattn {

// ------------------------------------------------------------------------------------------
// dK, dV: keys are the warp rows. S^T = K Q^T and dP^T = V dO^T come out with a key per row and a
// query per column; dV += P^T dO and dK += dS^T Q take P^T / dS^T straight from registers.
// ------------------------------------------------------------------------------------------
// BM: queries per tile of the inner loop. Shared memory: K, V [64][D + 8] (the warps' own rows),
// then Q, dO [2][BM][D + 8], then lse, delta [2][BM] fp32.
template <int D, int BM>
struct DkvSmem {
  static constexpr int ld = D + kPad;
  static constexpr int k = 0;
  static constexpr int v = k + kBlockRows * ld * 2;
  static constexpr int q = v + kBlockRows * ld * 2;
  static constexpr int dout = q + 2 * BM * ld * 2;
  static constexpr int lse = dout + 2 * BM * ld * 2;
  static constexpr int delta = lse + 2 * BM * 4;
  static constexpr int bytes = delta + 2 * BM * 4;
};

// kKVRegs: hold the warp's K and V fragments in registers for the whole loop (D <= 64); at
// D = 128 they are re-read from shared memory each tile, which keeps the accumulators in
// registers without spills.
template <typename T, int D, int BM, bool kKVRegs>
__global__ void __launch_bounds__(kThreads, 2) dkdv_kernel(SegAttnParams p, VecFlags vec) {
  using L = DkvSmem<D, BM>;
  SEGATTN_DYNAMIC_SMEM(unsigned char, smem);
  T* s_k = reinterpret_cast<T*>(smem + L::k);
  T* s_v = reinterpret_cast<T*>(smem + L::v);
  T* s_q = reinterpret_cast<T*>(smem + L::q);      // buffer i at + i * BM * ld
  T* s_do = reinterpret_cast<T*>(smem + L::dout);
  float* s_lse = reinterpret_cast<float*>(smem + L::lse);  // buffer i at + i * BM
  float* s_delta = reinterpret_cast<float*>(smem + L::delta);

  const int n0 = blockIdx.x * kBlockRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = head_ptr<T>(p.q, p.q_stride, b, h);
  const T* dout = head_ptr<T>(p.dout, p.dout_stride, b, h);
  const int32_t* seg_q = p.seg_q + (int64_t)b * p.nq;
  const int32_t* seg_k = p.seg_k + (int64_t)b * p.nk;
  const bool inclusive = p.inclusive != 0;
  const int64_t row_base = ((int64_t)b * p.heads + h) * p.nq;

  // The queries that see this key tile are a suffix: start at the tile of the first one; tiles
  // from loop.unmasked_begin on see every key, earlier ones are masked per key. Query rows past
  // nq load as zero with lse = +inf, so their P is 0 without a mask.
  const QueryLoop loop = query_loop(seg_q, p.nq, seg_k, p.nk, inclusive, n0, kBlockRows, BM);
  const int n_tiles = loop.begin < p.nq ? (p.nq - loop.begin + BM - 1) / BM : 0;
  auto load_q_tile = [&](int tile) {
    const int m0 = loop.begin + tile * BM, buf = tile % 2;
    load_tile<T, BM, D>(s_q + buf * BM * L::ld, q, p.q_stride[2], m0, p.nq, vec.q);
    load_tile<T, BM, D>(s_do + buf * BM * L::ld, dout, p.dout_stride[2], m0, p.nq, vec.dout);
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const bool valid = m0 + r < p.nq;
      s_lse[buf * BM + r] = valid ? p.lse[row_base + m0 + r] * kLog2e : INFINITY;
      s_delta[buf * BM + r] = valid ? p.delta[row_base + m0 + r] : 0.f;
    }
  };
  if (n_tiles > 0) {
    load_tile<T, kBlockRows, D>(s_k, head_ptr<T>(p.k, p.k_stride, b, h), p.k_stride[2], n0, p.nk, vec.k);
    load_tile<T, kBlockRows, D>(s_v, head_ptr<T>(p.v, p.v_stride, b, h), p.v_stride[2], n0, p.nk, vec.v);
    load_q_tile(0);
    ptx::cp_async_commit();
  }

  // Lane (g, t) owns keys g and g + 8 of its warp's 16: key r of the lane is key0 + 8 r.
  const int key0 = n0 + warp * kWarpRows + lane / 4;
  int qs[2];  // first query that sees the key (nq for keys past nk)
#pragma unroll
  for (int r = 0; r < 2; ++r)
    qs[r] = key0 + 8 * r < p.nk ? q_start(seg_q, p.nq, seg_k[key0 + 8 * r], inclusive) : p.nq;
  const int col0 = 2 * (lane % 4);
  const float scale_log2 = p.scale * kLog2e;
  T* s_k_warp = s_k + warp * kWarpRows * L::ld;
  T* s_v_warp = s_v + warp * kWarpRows * L::ld;

  float acc_dk[D / 8][4], acc_dv[D / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  uint32_t kf[kKVRegs ? D / 16 : 1][4], vf[kKVRegs ? D / 16 : 1][4];

  for (int j = 0; j < n_tiles; ++j) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile j has landed for all threads, and every warp is done with tile j - 1
    if constexpr (kKVRegs) {
      if (j == 0) {
        load_a_frags<D>(kf, s_k_warp, lane);
        load_a_frags<D>(vf, s_v_warp, lane);
      }
    }
    if (j + 1 < n_tiles) load_q_tile(j + 1);  // into the buffers tile j - 1 used
    ptx::cp_async_commit();
    const int m0 = loop.begin + j * BM, buf = j % 2;
    const T* tq = s_q + buf * BM * L::ld;
    const T* tdo = s_do + buf * BM * L::ld;
    const float* tlse = s_lse + buf * BM;
    const float* tdelta = s_delta + buf * BM;

    float st[BM / 8][4], dpt[BM / 8][4];  // S^T, dP^T: 16 keys x BM queries
    zero(st);
    zero(dpt);
    if constexpr (kKVRegs) {
      gemm_abt<T, BM, D>(st, kf, tq, lane);
      gemm_abt<T, BM, D>(dpt, vf, tdo, lane);
    } else {
      uint32_t af[D / 16][4];
      load_a_frags<D>(af, s_k_warp, lane);
      gemm_abt<T, BM, D>(st, af, tq, lane);
      load_a_frags<D>(af, s_v_warp, lane);
      gemm_abt<T, BM, D>(dpt, af, tdo, lane);
    }

    // P^T and dS^T in place. Hidden (masked) entries are selected, not multiplied: a key no
    // query sees may be padding holding NaN / Inf, and 0 * NaN is NaN. Such a key makes its
    // tile and every later-starting one masked (its q_start is nq), so unmasked tiles only meet
    // query rows past nq as zero rows with lse = +inf, where P is 0 already.
    const bool masked = m0 < loop.unmasked_begin;
#pragma unroll
    for (int c = 0; c < BM / 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * c + col0 + (e & 1);
        const bool hidden = masked && (m0 + col < qs[e / 2] || m0 + col >= p.nq);
        const float prob = hidden ? 0.f : exp2f(st[c][e] * scale_log2 - tlse[col]);
        st[c][e] = prob;
        dpt[c][e] = hidden ? 0.f : prob * (dpt[c][e] - tdelta[col]);
      }

    gemm_pb<T, D, BM>(acc_dv, st, tdo, lane);   // dV += P^T dO
    gemm_pb<T, D, BM>(acc_dk, dpt, tq, lane);   // dK += dS^T Q
  }

  // The warp's K / V rows in shared memory are read by this warp only; stage through them.
  T* dk = head_ptr<T>(p.dk, p.dk_stride, b, h);
  T* dv = head_ptr<T>(p.dv, p.dv_stride, b, h);
  store_warp_rows<T, D>(dv, p.dv_stride[2], n0 + warp * kWarpRows, p.nk, acc_dv, 1.f, s_v_warp, vec.dv, lane);
  store_warp_rows<T, D>(dk, p.dk_stride[2], n0 + warp * kWarpRows, p.nk, acc_dk, p.scale, s_k_warp, vec.dk, lane);
}

// ------------------------------------------------------------------------------------------
// dQ: queries are the warp rows, as in the forward. S = Q K^T and dP = dO V^T, then
// dQ += dS K with dS from registers and K through ldmatrix.trans.
// ------------------------------------------------------------------------------------------
// BN: keys per tile. Shared memory: Q, dO [64][D + 8], then K, V [2][BN][D + 8].
template <int D, int BN>
struct DqSmem {
  static constexpr int ld = D + kPad;
  static constexpr int q = 0;
  static constexpr int dout = q + kBlockRows * ld * 2;
  static constexpr int k = dout + kBlockRows * ld * 2;
  static constexpr int v = k + 2 * BN * ld * 2;
  static constexpr int bytes = v + 2 * BN * ld * 2;
};

// kQRegs: hold the warp's Q and dO fragments in registers for the whole loop (D <= 64); at
// D = 128 they are re-read from shared memory each tile (no spills).
template <typename T, int D, int BN, bool kQRegs>
__global__ void __launch_bounds__(kThreads, 2) dq_kernel(SegAttnParams p, VecFlags vec) {
  using L = DqSmem<D, BN>;
  SEGATTN_DYNAMIC_SMEM(unsigned char, smem);
  T* s_q = reinterpret_cast<T*>(smem + L::q);
  T* s_do = reinterpret_cast<T*>(smem + L::dout);
  T* s_k = reinterpret_cast<T*>(smem + L::k);  // buffer i at + i * BN * ld
  T* s_v = reinterpret_cast<T*>(smem + L::v);

  const int m0 = blockIdx.x * kBlockRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* k = head_ptr<T>(p.k, p.k_stride, b, h);
  const T* v = head_ptr<T>(p.v, p.v_stride, b, h);
  const int32_t* seg_q = p.seg_q + (int64_t)b * p.nq;
  const int32_t* seg_k = p.seg_k + (int64_t)b * p.nk;
  const bool inclusive = p.inclusive != 0;
  const int64_t row_base = ((int64_t)b * p.heads + h) * p.nq;

  // Same key loop as the forward: the visible prefix, masked only on boundary tiles; keys past
  // loop.end load as zero (they may hold NaN / Inf).
  const KeyLoop loop = key_loop(seg_q, p.nq, seg_k, p.nk, inclusive, m0, kBlockRows, BN);
  const int n_tiles = (loop.end + BN - 1) / BN;
  auto load_kv = [&](int tile) {
    load_tile<T, BN, D>(s_k + (tile % 2) * BN * L::ld, k, p.k_stride[2], tile * BN, loop.end, vec.k);
    load_tile<T, BN, D>(s_v + (tile % 2) * BN * L::ld, v, p.v_stride[2], tile * BN, loop.end, vec.v);
  };
  if (n_tiles > 0) {
    load_tile<T, kBlockRows, D>(s_q, head_ptr<T>(p.q, p.q_stride, b, h), p.q_stride[2], m0, p.nq, vec.q);
    load_tile<T, kBlockRows, D>(s_do, head_ptr<T>(p.dout, p.dout_stride, b, h), p.dout_stride[2], m0, p.nq,
                                vec.dout);
    load_kv(0);
    ptx::cp_async_commit();
  }

  const int row0 = m0 + warp * kWarpRows + lane / 4;  // rows row0 and row0 + 8 of the lane
  int kv[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    const bool valid = row < p.nq;
    kv[r] = valid ? kv_len(seg_k, p.nk, seg_q[row], inclusive) : 0;
    lse2[r] = valid ? p.lse[row_base + row] * kLog2e : INFINITY;
    delta[r] = valid ? p.delta[row_base + row] : 0.f;
  }
  const int col0 = 2 * (lane % 4);
  const float scale_log2 = p.scale * kLog2e;
  T* s_q_warp = s_q + warp * kWarpRows * L::ld;

  float acc[D / 8][4];
  zero(acc);
  uint32_t qf[kQRegs ? D / 16 : 1][4], dof[kQRegs ? D / 16 : 1][4];
  const T* s_do_warp = s_do + warp * kWarpRows * L::ld;

  for (int j = 0; j < n_tiles; ++j) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile j has landed for all threads, and every warp is done with tile j - 1
    if constexpr (kQRegs) {
      if (j == 0) {
        load_a_frags<D>(qf, s_q_warp, lane);
        load_a_frags<D>(dof, s_do_warp, lane);
      }
    }
    if (j + 1 < n_tiles) load_kv(j + 1);  // into the buffers tile j - 1 used
    ptx::cp_async_commit();
    const T* tk = s_k + (j % 2) * BN * L::ld;
    const T* tv = s_v + (j % 2) * BN * L::ld;

    float s[BN / 8][4], dp[BN / 8][4];
    zero(s);
    zero(dp);
    if constexpr (kQRegs) {
      gemm_abt<T, BN, D>(s, qf, tk, lane);
      gemm_abt<T, BN, D>(dp, dof, tv, lane);
    } else {
      uint32_t af[D / 16][4];
      load_a_frags<D>(af, s_q_warp, lane);
      gemm_abt<T, BN, D>(s, af, tk, lane);
      load_a_frags<D>(af, s_do_warp, lane);
      gemm_abt<T, BN, D>(dp, af, tv, lane);
    }

    // dS in place of dP (selected, not multiplied, where hidden).
    const int n0 = j * BN;
    const bool masked = n0 >= loop.unmasked_end;
#pragma unroll
    for (int c = 0; c < BN / 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2;
        const bool hidden = masked && n0 + 8 * c + col0 + (e & 1) >= kv[r];
        const float prob = hidden ? 0.f : exp2f(s[c][e] * scale_log2 - lse2[r]);
        dp[c][e] = hidden ? 0.f : prob * (dp[c][e] - delta[r]);
      }

    gemm_pb<T, D, BN>(acc, dp, tk, lane);  // dQ += dS K
  }

  store_warp_rows<T, D>(head_ptr<T>(p.dq, p.dq_stride, b, h), p.dq_stride[2], m0 + warp * kWarpRows, p.nq, acc,
                        p.scale, s_q_warp, vec.dq, lane);
}

template <typename T, int D, int BN, int BM, bool kRegs>
const char* backward_impl(const SegAttnParams& p, cudaStream_t stream) {
  const VecFlags vec = vec_flags(p);
  if (p.nk > 0) {
    const dim3 grid((p.nk + kBlockRows - 1) / kBlockRows, p.heads, p.batch);
    if (const char* err = launch(dkdv_kernel<T, D, BM, kRegs>, grid, DkvSmem<D, BM>::bytes, stream, p, vec))
      return err;
  }
  if (p.nq > 0) {
    const dim3 grid((p.nq + kBlockRows - 1) / kBlockRows, p.heads, p.batch);
    if (const char* err = launch(dq_kernel<T, D, BN, kRegs>, grid, DqSmem<D, BN>::bytes, stream, p, vec)) return err;
  }
  return nullptr;
}

template <typename T>
const char* backward_dtype(const SegAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {  // <T, D, keys per dQ tile, queries per dK/dV tile, A operands in registers>
    case 32: return backward_impl<T, 32, 64, 64, true>(p, stream);
    case 64: return backward_impl<T, 64, 64, 64, true>(p, stream);
    case 128: return backward_impl<T, 128, 32, 32, false>(p, stream);  // 32-wide tiles: no spills
    default: return "segattn_backward: head_dim must be 32, 64 or 128";
  }
}

}  // namespace segattn

extern "C" const char* segattn_backward(const SegAttnParams* p, void* stream) {
  if ((int64_t)p->batch * p->heads == 0) return nullptr;
  if (p->batch > 65535 || p->heads > 65535) return "segattn_backward: batch and heads must be <= 65535";
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p->dtype == SEGATTN_BF16 ? segattn::backward_dtype<__nv_bfloat16>(*p, s)
                                  : segattn::backward_dtype<__half>(*p, s);
}
