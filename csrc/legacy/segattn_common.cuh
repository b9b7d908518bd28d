// Device helpers shared by the forward and backward kernels: element types, tile copies between
// global and shared memory, and warp-level tensor-core GEMMs (wmma, sm_80+).
//
// Every kernel runs 4 warps; each warp owns 16 rows of the block's tile, so the per-row softmax
// work needs only __syncwarp, and __syncthreads guards the tiles that all warps share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>

#include "../segattn.h"
#include "../tile_range.h"

namespace segattn {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;              // rows of a tile owned by one warp (the wmma M)
constexpr int kBlockRows = kWarpRows * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Padding of shared-memory rows: keeps wmma's ldm a multiple of 16 bytes while shifting
// consecutive rows across banks.
constexpr int kPadHalf = 8;   // 16-bit elements
constexpr int kPadFloat = 4;  // fp32 elements

__device__ __forceinline__ float neg_inf() { return -INFINITY; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Shared-memory carving: each buffer starts on a 128-byte boundary (wmma needs 32).
__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// Pointer to the [B, H] slice of a strided [B, H, N, D] tensor.
template <typename T>
__device__ __forceinline__ T* head_ptr(const void* base, const int64_t* stride, int b, int h) {
  return (T*)base + b * stride[0] + h * stride[1];
}

// Copy rows [row0, row0 + rows) of a [n, D] slice (row stride `stride`) into smem [rows][ld].
// Rows past n are zero-filled, so tail tiles stay finite and add nothing to any product.
// `vec`: base and stride allow 16-byte loads.
template <typename T, int D>
__device__ void load_rows(T* smem, int ld, const T* g, int64_t stride, int row0, int rows, int n, bool vec) {
  if (vec) {
    constexpr int kVec = 8;  // 8 x 16-bit = 16 bytes
    constexpr int kPerRow = D / kVec;
    for (int i = threadIdx.x; i < rows * kPerRow; i += blockDim.x) {
      const int r = i / kPerRow, c = (i % kPerRow) * kVec;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < n) val = *reinterpret_cast<const uint4*>(g + (row0 + r) * stride + c);
      *reinterpret_cast<uint4*>(smem + r * ld + c) = val;
    }
  } else {
    const T zero = from_float<T>(0.f);
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
      const int r = i / D, c = i % D;
      smem[r * ld + c] = row0 + r < n ? g[(row0 + r) * stride + c] : zero;
    }
  }
}

// Write rows [row0, row0 + rows) of fp32 smem [rows][ld], times `factor`, to a [n, D] slice;
// rows past n are dropped.
template <typename T, int D>
__device__ void store_rows(T* g, int64_t stride, int row0, int rows, int n, const float* smem, int ld,
                           float factor) {
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int r = i / D, c = i % D;
    if (row0 + r < n) g[(row0 + r) * stride + c] = from_float<T>(smem[r * ld + c] * factor);
  }
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// One warp: c[16][N] (fp32 smem) = a[16][K] @ b[N][K]^T, all row-major in smem.
// Reading b as a column-major K x N matrix is what makes it b^T.
template <typename T, int N, int K>
__device__ void warp_gemm_abt(float* c, int ldc, const T* a, int lda, const T* b, int ldb) {
#pragma unroll
  for (int n = 0; n < N; n += 16) {
    FragAcc acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      FragA<T> fa;
      FragBCol<T> fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, b + n * ldb + k, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n, acc, ldc, wmma::mem_row_major);
  }
}

// One warp: acc[16][N] (register fragments) += a[16][K] @ b[K][N], row-major in smem.
template <typename T, int N, int K>
__device__ void warp_gemm_ab_acc(FragAcc (&acc)[N / 16], const T* a, int lda, const T* b, int ldb) {
#pragma unroll
  for (int k = 0; k < K; k += 16) {
    FragA<T> fa;
    wmma::load_matrix_sync(fa, a + k, lda);
#pragma unroll
    for (int n = 0; n < N; n += 16) {
      FragBRow<T> fb;
      wmma::load_matrix_sync(fb, b + k * ldb + n, ldb);
      wmma::mma_sync(acc[n / 16], fa, fb, acc[n / 16]);
    }
  }
}

// One warp: c[16][N] (fp32 smem) += a[16][K] @ b[K][N]. The accumulator lives in smem so that
// the online softmax can rescale it row by row between calls (wmma hides the register layout).
template <typename T, int N, int K>
__device__ void warp_gemm_ab_smem(float* c, int ldc, const T* a, int lda, const T* b, int ldb) {
#pragma unroll
  for (int n = 0; n < N; n += 16) {
    FragAcc acc;
    wmma::load_matrix_sync(acc, c + n, ldc, wmma::mem_row_major);
#pragma unroll
    for (int k = 0; k < K; k += 16) {
      FragA<T> fa;
      FragBRow<T> fb;
      wmma::load_matrix_sync(fa, a + k, lda);
      wmma::load_matrix_sync(fb, b + k * ldb + n, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + n, acc, ldc, wmma::mem_row_major);
  }
}

template <int N>
__device__ __forceinline__ void zero_acc(FragAcc (&acc)[N / 16]) {
#pragma unroll
  for (int i = 0; i < N / 16; ++i) wmma::fill_fragment(acc[i], 0.f);
}

// One warp: store fragments acc[16][N] into fp32 smem rows.
template <int N>
__device__ __forceinline__ void warp_store_acc(float* c, int ldc, const FragAcc (&acc)[N / 16]) {
#pragma unroll
  for (int n = 0; n < N; n += 16) wmma::store_matrix_sync(c + n, acc[n / 16], ldc, wmma::mem_row_major);
}

// 16-byte global loads need 16-byte aligned bases and row strides that are multiples of 8.
inline bool vec_ok(const void* base, const int64_t* stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[0] % 8 == 0 && stride[1] % 8 == 0 &&
         stride[2] % 8 == 0;
}

// Which tensors allow 16-byte loads (see load_rows).
struct VecFlags {
  bool q, k, v, dout;
};

inline VecFlags vec_flags(const SegAttnParams& p) {
  return VecFlags{vec_ok(p.q, p.q_stride), vec_ok(p.k, p.k_stride), vec_ok(p.v, p.v_stride),
                  p.dout != nullptr && vec_ok(p.dout, p.dout_stride)};
}

// Opt a kernel into more than 48 KiB of dynamic shared memory, then launch it.
template <typename... Args>
const char* launch(void (*kernel)(Args...), dim3 grid, int smem_bytes, cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args...);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace segattn
