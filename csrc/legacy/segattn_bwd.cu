// Segment attention backward, deterministic (no atomics), in two passes that mirror the forward:
//
//   dkdv_kernel: one block per key tile of 64; loops over the query suffix that sees the tile and
//                accumulates dK, dV in registers.
//   dq_kernel:   one block per query tile of 64; loops over the visible key prefix (as the
//                forward does) and accumulates dQ in registers.
//
// Both recompute P = exp(scale * q . k - lse) from the forward's lse, with
// dS = P * (dP - delta), dP = dout . v, delta = rowsum(dout * out) (computed by the caller).
// Rows that see no key have lse = +inf, so P = 0 there and they add nothing.
#include "segattn_common.cuh"

namespace segattn {

// ------------------------------------------------------------------------------------------
// dQ pass
// ------------------------------------------------------------------------------------------
template <int D, int BN>
struct DqSmem {
  static constexpr int ldh = D + kPadHalf, lds = BN + kPadFloat, ldp = BN + kPadHalf, ldo = D + kPadFloat;
  static constexpr int q = 0;
  static constexpr int dout = q + align128(kBlockRows * ldh * 2);
  static constexpr int kv = dout + align128(kBlockRows * ldh * 2);
  static constexpr int lse = kv + align128(kBlockRows * 4);
  static constexpr int delta = lse + align128(kBlockRows * 4);
  static constexpr int k = delta + align128(kBlockRows * 4);
  static constexpr int v = k + align128(BN * ldh * 2);
  static constexpr int s = v + align128(BN * ldh * 2);
  static constexpr int dp = s + align128(kBlockRows * lds * 4);
  static constexpr int ds = dp + align128(kBlockRows * lds * 4);
  static constexpr int loop_end = ds + align128(kBlockRows * ldp * 2);
  // After the key loop the dQ accumulator is staged in fp32 over the k..ds buffers.
  static constexpr int stage = k;
  static constexpr int stage_end = stage + align128(kBlockRows * ldo * 4);
  static constexpr int bytes = loop_end > stage_end ? loop_end : stage_end;
};

template <typename T, int D, int BN>
__global__ void __launch_bounds__(kThreads) dq_kernel(SegAttnParams p, VecFlags vec) {
  using L = DqSmem<D, BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_q = reinterpret_cast<T*>(smem + L::q);
  T* s_do = reinterpret_cast<T*>(smem + L::dout);
  int* s_kv = reinterpret_cast<int*>(smem + L::kv);
  float* s_lse = reinterpret_cast<float*>(smem + L::lse);
  float* s_delta = reinterpret_cast<float*>(smem + L::delta);
  T* s_k = reinterpret_cast<T*>(smem + L::k);
  T* s_v = reinterpret_cast<T*>(smem + L::v);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  float* s_dp = reinterpret_cast<float*>(smem + L::dp);
  T* s_ds = reinterpret_cast<T*>(smem + L::ds);
  float* s_stage = reinterpret_cast<float*>(smem + L::stage);

  const int m0 = blockIdx.x * kBlockRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* seg_q = p.seg_q + (int64_t)b * p.nq;
  const int32_t* seg_k = p.seg_k + (int64_t)b * p.nk;
  const bool inclusive = p.inclusive != 0;
  const int64_t row_base = ((int64_t)b * p.heads + h) * p.nq;

  for (int r = threadIdx.x; r < kBlockRows; r += blockDim.x) {
    const bool valid = m0 + r < p.nq;
    s_kv[r] = valid ? kv_len(seg_k, p.nk, seg_q[m0 + r], inclusive) : 0;
    s_lse[r] = valid ? p.lse[row_base + m0 + r] * kLog2e : INFINITY;
    s_delta[r] = valid ? p.delta[row_base + m0 + r] : 0.f;
  }
  load_rows<T, D>(s_q, L::ldh, head_ptr<T>(p.q, p.q_stride, b, h), p.q_stride[2], m0, kBlockRows, p.nq, vec.q);
  load_rows<T, D>(s_do, L::ldh, head_ptr<T>(p.dout, p.dout_stride, b, h), p.dout_stride[2], m0, kBlockRows,
                  p.nq, vec.dout);
  const T* k = head_ptr<T>(p.k, p.k_stride, b, h);
  const T* v = head_ptr<T>(p.v, p.v_stride, b, h);

  const int row = warp * kWarpRows + lane / 2, half = lane % 2;  // a lane pair per row
  const float* s_row = s_s + row * L::lds;
  const float* dp_row = s_dp + row * L::lds;
  T* ds_row = s_ds + row * L::ldp;
  const float scale_log2 = p.scale * kLog2e;

  FragAcc acc[D / 16];
  zero_acc<D>(acc);

  // Same key loop as the forward: the visible prefix, masked only on boundary tiles.
  const KeyLoop loop = key_loop(seg_q, p.nq, seg_k, p.nk, inclusive, m0, kBlockRows, BN);
  for (int n0 = 0; n0 < loop.end; n0 += BN) {
    __syncthreads();  // every warp is done with the previous K/V tile (and the prologue is visible)
    // As in the forward, keys hidden from the whole tile load as 0 (they may hold NaN / Inf).
    load_rows<T, D>(s_k, L::ldh, k, p.k_stride[2], n0, BN, loop.end, vec.k);
    load_rows<T, D>(s_v, L::ldh, v, p.v_stride[2], n0, BN, loop.end, vec.v);
    __syncthreads();

    const int w = warp * kWarpRows;
    warp_gemm_abt<T, BN, D>(s_s + w * L::lds, L::lds, s_q + w * L::ldh, L::ldh, s_k, L::ldh);    // S
    warp_gemm_abt<T, BN, D>(s_dp + w * L::lds, L::lds, s_do + w * L::ldh, L::ldh, s_v, L::ldh);  // dP
    __syncwarp();

    const bool masked = n0 >= loop.unmasked_end;
    const int visible_end = s_kv[row] - n0;
    const float lse2 = s_lse[row], delta = s_delta[row];
    for (int c = half; c < BN; c += 2) {
      const bool hidden = masked && c >= visible_end;  // select, not multiply: 0 * NaN is NaN
      const float prob = hidden ? 0.f : exp2f(s_row[c] * scale_log2 - lse2);
      ds_row[c] = from_float<T>(hidden ? 0.f : prob * (dp_row[c] - delta));
    }
    __syncwarp();

    warp_gemm_ab_acc<T, D, BN>(acc, s_ds + w * L::ldp, L::ldp, s_k, L::ldh);  // dQ += dS K
  }

  __syncthreads();  // the staging area overlays the loop's buffers
  warp_store_acc<D>(s_stage + warp * kWarpRows * L::ldo, L::ldo, acc);
  __syncthreads();
  store_rows<T, D>(head_ptr<T>(p.dq, p.dq_stride, b, h), p.dq_stride[2], m0, kBlockRows, p.nq, s_stage, L::ldo,
                   p.scale);
}

// ------------------------------------------------------------------------------------------
// dK, dV pass
// ------------------------------------------------------------------------------------------
// BM: queries per tile of the inner loop. Each warp owns 16 of the block's 64 keys.
template <int D, int BM>
struct DkvSmem {
  static constexpr int ldh = D + kPadHalf, lds = BM + kPadFloat, ldp = BM + kPadHalf, ldo = D + kPadFloat;
  static constexpr int k = 0;
  static constexpr int v = k + align128(kBlockRows * ldh * 2);
  static constexpr int qs = v + align128(kBlockRows * ldh * 2);
  static constexpr int q = qs + align128(kBlockRows * 4);
  static constexpr int dout = q + align128(BM * ldh * 2);
  static constexpr int lse = dout + align128(BM * ldh * 2);
  static constexpr int delta = lse + align128(BM * 4);
  static constexpr int s = delta + align128(BM * 4);
  static constexpr int dp = s + align128(kBlockRows * lds * 4);
  static constexpr int pt = dp + align128(kBlockRows * lds * 4);
  static constexpr int dst = pt + align128(kBlockRows * ldp * 2);
  static constexpr int loop_end = dst + align128(kBlockRows * ldp * 2);
  // After the query loop dK and dV are staged in fp32 (one after the other) over q..dst.
  static constexpr int stage = q;
  static constexpr int stage_end = stage + align128(kBlockRows * ldo * 4);
  static constexpr int bytes = loop_end > stage_end ? loop_end : stage_end;
};

template <typename T, int D, int BM>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(SegAttnParams p, VecFlags vec) {
  using L = DkvSmem<D, BM>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem + L::k);
  T* s_v = reinterpret_cast<T*>(smem + L::v);
  int* s_qs = reinterpret_cast<int*>(smem + L::qs);
  T* s_q = reinterpret_cast<T*>(smem + L::q);
  T* s_do = reinterpret_cast<T*>(smem + L::dout);
  float* s_lse = reinterpret_cast<float*>(smem + L::lse);
  float* s_delta = reinterpret_cast<float*>(smem + L::delta);
  float* s_s = reinterpret_cast<float*>(smem + L::s);
  float* s_dp = reinterpret_cast<float*>(smem + L::dp);
  T* s_pt = reinterpret_cast<T*>(smem + L::pt);
  T* s_dst = reinterpret_cast<T*>(smem + L::dst);
  float* s_stage = reinterpret_cast<float*>(smem + L::stage);

  const int n0 = blockIdx.x * kBlockRows, h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t* seg_q = p.seg_q + (int64_t)b * p.nq;
  const int32_t* seg_k = p.seg_k + (int64_t)b * p.nk;
  const bool inclusive = p.inclusive != 0;
  const int64_t row_base = ((int64_t)b * p.heads + h) * p.nq;

  // Per key: the first query that sees it; keys past nk are seen by none.
  for (int r = threadIdx.x; r < kBlockRows; r += blockDim.x)
    s_qs[r] = n0 + r < p.nk ? q_start(seg_q, p.nq, seg_k[n0 + r], inclusive) : p.nq;
  load_rows<T, D>(s_k, L::ldh, head_ptr<T>(p.k, p.k_stride, b, h), p.k_stride[2], n0, kBlockRows, p.nk, vec.k);
  load_rows<T, D>(s_v, L::ldh, head_ptr<T>(p.v, p.v_stride, b, h), p.v_stride[2], n0, kBlockRows, p.nk, vec.v);
  const T* q = head_ptr<T>(p.q, p.q_stride, b, h);
  const T* dout = head_ptr<T>(p.dout, p.dout_stride, b, h);

  const int row = warp * kWarpRows + lane / 2, half = lane % 2;  // a lane pair per key
  const float* s_row = s_s + row * L::lds;
  const float* dp_row = s_dp + row * L::lds;
  T* pt_row = s_pt + row * L::ldp;
  T* dst_row = s_dst + row * L::ldp;
  const float scale_log2 = p.scale * kLog2e;

  FragAcc acc_dk[D / 16], acc_dv[D / 16];
  zero_acc<D>(acc_dk);
  zero_acc<D>(acc_dv);

  // The queries that see this key tile are a suffix: start at the tile of the first one; tiles
  // from loop.unmasked_begin on see every key, earlier ones are masked per key. Query rows past
  // nq carry lse = +inf, so their P is 0 without a mask.
  const QueryLoop loop = query_loop(seg_q, p.nq, seg_k, p.nk, inclusive, n0, kBlockRows, BM);
  for (int m0 = loop.begin; m0 < p.nq; m0 += BM) {
    __syncthreads();  // every warp is done with the previous Q/dO tile (and the prologue is visible)
    load_rows<T, D>(s_q, L::ldh, q, p.q_stride[2], m0, BM, p.nq, vec.q);
    load_rows<T, D>(s_do, L::ldh, dout, p.dout_stride[2], m0, BM, p.nq, vec.dout);
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
      const bool valid = m0 + r < p.nq;
      s_lse[r] = valid ? p.lse[row_base + m0 + r] * kLog2e : INFINITY;
      s_delta[r] = valid ? p.delta[row_base + m0 + r] : 0.f;
    }
    __syncthreads();

    const int w = warp * kWarpRows;
    warp_gemm_abt<T, BM, D>(s_s + w * L::lds, L::lds, s_k + w * L::ldh, L::ldh, s_q, L::ldh);    // S^T
    warp_gemm_abt<T, BM, D>(s_dp + w * L::lds, L::lds, s_v + w * L::ldh, L::ldh, s_do, L::ldh);  // dP^T
    __syncwarp();

    const bool masked = m0 < loop.unmasked_begin;
    const int first_visible = s_qs[row] - m0;  // columns c >= first_visible see this key
    for (int c = half; c < BM; c += 2) {
      // Hidden: masked, or a query row past nq. Selected, not multiplied: a key no query sees may
      // be padding holding NaN / Inf, and 0 * NaN is NaN.
      const bool hidden = (masked && c < first_visible) || m0 + c >= p.nq;
      const float prob = hidden ? 0.f : exp2f(s_row[c] * scale_log2 - s_lse[c]);
      pt_row[c] = from_float<T>(prob);
      dst_row[c] = from_float<T>(hidden ? 0.f : prob * (dp_row[c] - s_delta[c]));
    }
    __syncwarp();

    warp_gemm_ab_acc<T, D, BM>(acc_dv, s_pt + w * L::ldp, L::ldp, s_do, L::ldh);  // dV += P^T dO
    warp_gemm_ab_acc<T, D, BM>(acc_dk, s_dst + w * L::ldp, L::ldp, s_q, L::ldh);  // dK += dS^T Q
  }

  float* stage = s_stage + warp * kWarpRows * L::ldo;
  __syncthreads();  // the staging area overlays the loop's buffers
  warp_store_acc<D>(stage, L::ldo, acc_dv);
  __syncthreads();
  store_rows<T, D>(head_ptr<T>(p.dv, p.dv_stride, b, h), p.dv_stride[2], n0, kBlockRows, p.nk, s_stage, L::ldo,
                   1.f);
  __syncthreads();
  warp_store_acc<D>(stage, L::ldo, acc_dk);
  __syncthreads();
  store_rows<T, D>(head_ptr<T>(p.dk, p.dk_stride, b, h), p.dk_stride[2], n0, kBlockRows, p.nk, s_stage, L::ldo,
                   p.scale);
}

template <typename T, int D, int BN, int BM>
const char* backward_impl(const SegAttnParams& p, cudaStream_t stream) {
  const VecFlags vec = vec_flags(p);
  if (p.nk > 0) {
    const dim3 grid((p.nk + kBlockRows - 1) / kBlockRows, p.heads, p.batch);
    if (const char* err = launch(dkdv_kernel<T, D, BM>, grid, DkvSmem<D, BM>::bytes, stream, p, vec)) return err;
  }
  if (p.nq > 0) {
    const dim3 grid((p.nq + kBlockRows - 1) / kBlockRows, p.heads, p.batch);
    if (const char* err = launch(dq_kernel<T, D, BN>, grid, DqSmem<D, BN>::bytes, stream, p, vec)) return err;
  }
  return nullptr;
}

template <typename T>
const char* backward_dtype(const SegAttnParams& p, cudaStream_t stream) {
  switch (p.head_dim) {  // <T, D, keys per dQ tile, queries per dK/dV tile>
    case 32: return backward_impl<T, 32, 64, 64>(p, stream);
    case 64: return backward_impl<T, 64, 64, 64>(p, stream);
    case 128: return backward_impl<T, 128, 32, 32>(p, stream);  // smaller tiles keep smem under ~90 KiB
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
