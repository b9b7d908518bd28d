// Segment attention forward, FlashAttention-2 schedule: one block per (64-row query tile, head,
// batch); each of the 4 warps owns 16 query rows and keeps them in registers all the way through:
// Q fragments, the scores S = Q K^T, the online softmax, the output accumulator O += P V.
// K / V tiles stream through shared memory with cp.async, double-buffered: tile j + 1 is in
// flight while tile j is multiplied.
//
// out[i] = sum_j softmax_j(scale * q_i . k_j) v_j over the visible keys j < kv_len(i); rows that
// see no key get out = 0 and lse = +inf (so the backward's exp(s - lse) is 0 for them).
#include "segattn_common.cuh"

namespace segattn {

// Shared memory of the forward: Q [64][D + 8], then K [2][BN][D + 8] and V [2][BN][D + 8].
template <int D, int BN>
struct FwdSmem {
  static constexpr int ld = D + kPad;
  static constexpr int q = 0;
  static constexpr int k = q + kBlockRows * ld * 2;
  static constexpr int v = k + 2 * BN * ld * 2;
  static constexpr int bytes = v + 2 * BN * ld * 2;
};

template <typename T, int D, int BN>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(SegAttnParams p, VecFlags vec) {
  using L = FwdSmem<D, BN>;
  SEGATTN_DYNAMIC_SMEM(unsigned char, smem);
  T* s_q = reinterpret_cast<T*>(smem + L::q);
  T* s_k = reinterpret_cast<T*>(smem + L::k);  // buffer i at s_k + i * BN * ld
  T* s_v = reinterpret_cast<T*>(smem + L::v);

  const int m0 = blockIdx.x * kBlockRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = head_ptr<T>(p.q, p.q_stride, b, h);
  const T* k = head_ptr<T>(p.k, p.k_stride, b, h);
  const T* v = head_ptr<T>(p.v, p.v_stride, b, h);
  const int32_t* seg_q = p.seg_q + (int64_t)b * p.nq;
  const int32_t* seg_k = p.seg_k + (int64_t)b * p.nk;
  const bool inclusive = p.inclusive != 0;

  // The segment logic is all in the loop bounds: keys past loop.end are invisible to the whole
  // tile (never loaded), key tiles below loop.unmasked_end are visible to every row (no mask),
  // only the rest are masked per row.
  const KeyLoop loop = key_loop(seg_q, p.nq, seg_k, p.nk, inclusive, m0, kBlockRows, BN);
  const int n_tiles = (loop.end + BN - 1) / BN;
  auto load_kv = [&](int tile) {
    constexpr int tile_elems = BN * L::ld;
    load_tile<T, BN, D>(s_k + (tile % 2) * tile_elems, k, p.k_stride[2], tile * BN, loop.end, vec.k);
    load_tile<T, BN, D>(s_v + (tile % 2) * tile_elems, v, p.v_stride[2], tile * BN, loop.end, vec.v);
  };
  if (n_tiles > 0) {
    load_tile<T, kBlockRows, D>(s_q, q, p.q_stride[2], m0, p.nq, vec.q);
    load_kv(0);
    ptx::cp_async_commit();
  }

  // Lane (g, t) owns rows g and g + 8 of its warp's 16: row r of the lane is row0 + 8 r.
  const int row0 = m0 + warp * kWarpRows + lane / 4;
  int kv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    kv[r] = row0 + 8 * r < p.nq ? kv_len(seg_k, p.nk, seg_q[row0 + 8 * r], inclusive) : 0;
  const int col0 = 2 * (lane % 4);  // the lane's first column in each 8-column fragment

  const float scale_log2 = p.scale * kLog2e;
  float acc[D / 8][4];
  zero(acc);
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max of the scores, log2 units
  float l_run[2] = {0.f, 0.f};              // this lane's part of the running row sum of exp2
  uint32_t qf[D / 16][4];
  T* s_q_warp = s_q + warp * kWarpRows * L::ld;

  for (int j = 0; j < n_tiles; ++j) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile j has landed for all threads, and every warp is done with tile j - 1
    if (j == 0) load_a_frags<D>(qf, s_q_warp, lane);
    if (j + 1 < n_tiles) load_kv(j + 1);  // into the buffer tile j - 1 used
    ptx::cp_async_commit();

    float s[BN / 8][4];
    zero(s);
    gemm_abt<T, BN, D>(s, qf, s_k + (j % 2) * BN * L::ld, lane);

    // Scale to log2 units; on a boundary tile hide the columns at or past each row's kv_len.
    const int n0 = j * BN;
    const bool masked = n0 >= loop.unmasked_end;
#pragma unroll
    for (int c = 0; c < BN / 8; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = s[c][e] * scale_log2;
        s[c][e] = masked && n0 + 8 * c + col0 + (e & 1) >= kv[e / 2] ? -INFINITY : x;
      }

    // Online softmax: row max over the quad's 4 lanes, rescale what has been summed so far.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int c = 0; c < BN / 8; ++c) mx = fmaxf(mx, fmaxf(s[c][2 * r], s[c][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_use = mx == -INFINITY ? 0.f : mx;  // a row with nothing seen yet stays at 0
      const float alpha = exp2f(m_run[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int c = 0; c < BN / 8; ++c) {
        s[c][2 * r] = exp2f(s[c][2 * r] - m_use);
        s[c][2 * r + 1] = exp2f(s[c][2 * r + 1] - m_use);
        sum += s[c][2 * r] + s[c][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + sum;
      m_run[r] = mx;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        acc[c][2 * r] *= alpha;
        acc[c][2 * r + 1] *= alpha;
      }
    }

    gemm_pb<T, D, BN>(acc, s, s_v + (j % 2) * BN * L::ld, lane);  // O += P V
  }

  // Epilogue: the row sums over the quad, normalise, write lse (natural log) and the output.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = l > 0.f ? 1.f / l : 0.f;
    const int row = row0 + 8 * r;
    if (lane % 4 == 0 && row < p.nq)
      p.lse[((int64_t)b * p.heads + h) * p.nq + row] = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : INFINITY;
  }
#pragma unroll
  for (int c = 0; c < D / 8; ++c) {
    acc[c][0] *= inv[0];
    acc[c][1] *= inv[0];
    acc[c][2] *= inv[1];
    acc[c][3] *= inv[1];
  }
  // The warp's Q rows in shared memory are free (Q lives in registers since tile 0).
  store_warp_rows<T, D>(head_ptr<T>(p.out, p.out_stride, b, h), p.out_stride[2], m0 + warp * kWarpRows, p.nq, acc,
                        1.f, s_q_warp, vec.out, lane);
}

template <typename T, int D, int BN>
const char* forward_impl(const SegAttnParams& p, cudaStream_t stream) {
  const dim3 grid((p.nq + kBlockRows - 1) / kBlockRows, p.heads, p.batch);
  return launch(fwd_kernel<T, D, BN>, grid, FwdSmem<D, BN>::bytes, stream, p, vec_flags(p));
}

template <typename T>
const char* forward_dtype(const SegAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {  // <T, D, keys per tile>
    case 32: return forward_impl<T, 32, 64>(p, stream);
    case 64: return forward_impl<T, 64, 64>(p, stream);
    case 128: return forward_impl<T, 128, 64>(p, stream);
    default: return "segattn_forward: head_dim must be 32, 64 or 128";
  }
}

}  // namespace segattn

extern "C" int segattn_supports_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

extern "C" const char* segattn_forward(const SegAttnParams* p, void* stream) {
  if ((int64_t)p->batch * p->heads * p->nq == 0) return nullptr;  // nothing to write
  if (p->batch > 65535 || p->heads > 65535) return "segattn_forward: batch and heads must be <= 65535";
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p->dtype == SEGATTN_BF16 ? segattn::forward_dtype<__nv_bfloat16>(*p, s)
                                  : segattn::forward_dtype<__half>(*p, s);
}
