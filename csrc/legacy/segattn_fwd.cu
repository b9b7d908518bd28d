// Segment attention forward: one block per (query tile of 64 rows, head, batch); FlashAttention-2
// schedule with an online softmax, tensor cores through wmma.
//
// out[i] = sum_j softmax_j(scale * q_i . k_j) v_j over the visible keys j < kv_len(i); rows that
// see no key get out = 0 and lse = +inf (so the backward's exp(s - lse) is 0 for them).
#include "segattn_common.cuh"

namespace segattn {

// Shared-memory layout of the forward (byte offsets). BN: keys per tile.
template <int D, int BN>
struct FwdSmem {
  static constexpr int ldh = D + kPadHalf;   // q, k, v rows (16-bit)
  static constexpr int lds = BN + kPadFloat; // scores (fp32)
  static constexpr int ldp = BN + kPadHalf;  // probabilities (16-bit)
  static constexpr int ldo = D + kPadFloat;  // output accumulator (fp32)
  static constexpr int q = 0;
  static constexpr int k = q + align128(kBlockRows * ldh * 2);
  static constexpr int v = k + align128(BN * ldh * 2);
  static constexpr int s = v + align128(BN * ldh * 2);
  static constexpr int p = s + align128(kBlockRows * lds * 4);
  static constexpr int o = p + align128(kBlockRows * ldp * 2);
  static constexpr int kv = o + align128(kBlockRows * ldo * 4);
  static constexpr int bytes = kv + align128(kBlockRows * 4);
};

template <typename T, int D, int BN>
__global__ void __launch_bounds__(kThreads) fwd_kernel(SegAttnParams p, VecFlags vec) {
  using L = FwdSmem<D, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem + L::q);
  T* s_k = reinterpret_cast<T*>(smem + L::k);
  T* s_v = reinterpret_cast<T*>(smem + L::v);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  T* s_p = reinterpret_cast<T*>(smem + L::p);
  float* s_o = reinterpret_cast<float*>(smem + L::o);
  int* s_kv = reinterpret_cast<int*>(smem + L::kv);

  const int m0 = blockIdx.x * kBlockRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = head_ptr<T>(p.q, p.q_stride, b, h);
  const T* k = head_ptr<T>(p.k, p.k_stride, b, h);
  const T* v = head_ptr<T>(p.v, p.v_stride, b, h);
  const int32_t* seg_q = p.seg_q + (int64_t)b * p.nq;
  const int32_t* seg_k = p.seg_k + (int64_t)b * p.nk;
  const bool inclusive = p.inclusive != 0;

  // Per-row length of the visible key prefix; rows past nq see nothing.
  for (int r = threadIdx.x; r < kBlockRows; r += blockDim.x)
    s_kv[r] = m0 + r < p.nq ? kv_len(seg_k, p.nk, seg_q[m0 + r], inclusive) : 0;
  load_rows<T, D>(s_q, L::ldh, q, p.q_stride[2], m0, kBlockRows, p.nq, vec.q);
  for (int i = threadIdx.x; i < kBlockRows * L::ldo; i += blockDim.x) s_o[i] = 0.f;
  __syncthreads();

  // Each lane pair owns one row of its warp's 16: lane 2r and 2r+1 split the columns.
  const int row = warp * kWarpRows + lane / 2, half = lane % 2;
  float* s_row = s_s + row * L::lds;
  T* p_row = s_p + row * L::ldp;
  float* o_row = s_o + row * L::ldo;
  const float scale_log2 = p.scale * kLog2e;
  float m_run = neg_inf(), l_run = 0.f;  // running max (log2 units) and sum of exp2

  // The segment logic is all in the loop bounds: keys past loop.end are invisible to the whole
  // tile, key tiles below loop.unmasked_end are visible to every row, only the rest are masked.
  const KeyLoop loop = key_loop(seg_q, p.nq, seg_k, p.nk, inclusive, m0, kBlockRows, BN);
  for (int n0 = 0; n0 < loop.end; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tile
    // Keys past loop.end (<= nk) are hidden from the whole tile: they load as 0, because they
    // may be padding holding NaN / Inf, and a masked P of 0 times a NaN V would still be NaN.
    load_rows<T, D>(s_k, L::ldh, k, p.k_stride[2], n0, BN, loop.end, vec.k);
    load_rows<T, D>(s_v, L::ldh, v, p.v_stride[2], n0, BN, loop.end, vec.v);
    __syncthreads();

    warp_gemm_abt<T, BN, D>(s_s + warp * kWarpRows * L::lds, L::lds, s_q + warp * kWarpRows * L::ldh, L::ldh,
                            s_k, L::ldh);
    __syncwarp();

    // Online softmax of this row over the tile.
    const bool masked = n0 >= loop.unmasked_end;
    const int visible_end = s_kv[row] - n0;  // columns c < visible_end are visible
    float tile_max = neg_inf();
    for (int c = half; c < BN; c += 2) {
      const float x = masked && c >= visible_end ? neg_inf() : s_row[c] * scale_log2;
      s_row[c] = x;
      tile_max = fmaxf(tile_max, x);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m_run, tile_max);
    const float m_use = m_new == neg_inf() ? 0.f : m_new;  // a row with nothing seen yet stays at 0
    const float alpha = exp2f(m_run - m_use);
    float tile_sum = 0.f;
    for (int c = half; c < BN; c += 2) {
      const float e = exp2f(s_row[c] - m_use);
      p_row[c] = from_float<T>(e);
      tile_sum += e;
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    l_run = l_run * alpha + tile_sum;
    m_run = m_new;
    for (int c = half; c < D; c += 2) o_row[c] *= alpha;
    __syncwarp();

    warp_gemm_ab_smem<T, D, BN>(s_o + warp * kWarpRows * L::ldo, L::ldo, s_p + warp * kWarpRows * L::ldp,
                                L::ldp, s_v, L::ldh);
  }
  __syncwarp();

  // Epilogue: normalise, write lse (natural log) and the output.
  const float inv = l_run > 0.f ? 1.f / l_run : 0.f;
  for (int c = half; c < D; c += 2) o_row[c] *= inv;
  if (half == 0 && m0 + row < p.nq) {
    const int64_t at = ((int64_t)b * p.heads + h) * p.nq + m0 + row;
    p.lse[at] = l_run > 0.f ? (m_run + log2f(l_run)) * kLn2 : INFINITY;
  }
  __syncthreads();
  store_rows<T, D>(head_ptr<T>(p.out, p.out_stride, b, h), p.out_stride[2], m0, kBlockRows, p.nq, s_o, L::ldo,
                   1.f);
}

template <typename T, int D, int BN>
const char* forward_impl(const SegAttnParams& p, cudaStream_t stream) {
  const dim3 grid((p.nq + kBlockRows - 1) / kBlockRows, p.heads, p.batch);
  return launch(fwd_kernel<T, D, BN>, grid, FwdSmem<D, BN>::bytes, stream, p, vec_flags(p));
}

template <typename T>
const char* forward_dtype(const SegAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return forward_impl<T, 32, 64>(p, stream);
    case 64: return forward_impl<T, 64, 64>(p, stream);
    case 128: return forward_impl<T, 128, 32>(p, stream);  // smaller key tiles keep smem under ~90 KiB
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
