// Device helpers shared by the forward and backward kernels: element types, tile copies between
// global and shared memory (cp.async), and the warp-level tile GEMMs on mma.sync.m16n8k16.
//
// Every kernel runs 4 warps; each warp owns 16 rows of the block's 64-row tile (the A operand of
// its GEMMs), so row statistics stay in the warp's registers (quad shuffles) and __syncthreads
// guards only the tiles that all warps read (the B operands).
//
// Register tiles. A warp's 16 x N fp32 accumulator is `float acc[N / 8][4]`: acc[j] is the
// m16n8 C fragment of columns [8j, 8j + 8) (ptx.cuh), so lane (g, t) holds rows g and g + 8,
// columns 8j + 2t and 8j + 2t + 1. Shared-memory tiles are row-major with rows of D + 8 16-bit
// elements: ldmatrix's 8 row addresses then fall in 8 different 16-byte bank groups.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <string.h>

#include "launch.cuh"
#include "ptx.cuh"
#include "segattn.h"
#include "tile_range.h"

// Dynamic shared memory of a kernel (the emulation may define its own).
#ifndef SEGATTN_DYNAMIC_SMEM
#define SEGATTN_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
#endif

namespace segattn {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 16;                  // rows of a tile owned by one warp (the mma M)
constexpr int kBlockRows = kWarpRows * kWarps; // rows of a block's own tile (queries or keys)
constexpr int kPad = 8;                        // 16-bit elements of padding per shared-memory row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one u32 of two T (lo in the low half), the operand format of mma and ldmatrix.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// Pointer to the [B, H] slice of a strided [B, H, N, D] tensor.
template <typename T>
__device__ __forceinline__ T* head_ptr(const void* base, const int64_t* stride, int b, int h) {
  return (T*)base + b * stride[0] + h * stride[1];
}

// Block-wide: copy rows [row0, row0 + ROWS) of a [n, D] slice (row stride `stride`) into smem
// [ROWS][D + kPad]. Rows at or past `valid_end` are zero-filled (they may be padding holding NaN,
// and a zero P times a NaN V is still NaN). `vec`: 16-byte aligned base and strides, so the copy
// is cp.async of 16 bytes (it lands at the next cp_async_wait); else plain element copies.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t stride, int row0, int valid_end, bool vec) {
  constexpr int ld = D + kPad;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert(ROWS * kChunks % kThreads == 0, "every thread copies the same number of chunks");
  if (vec) {
#pragma unroll
    for (int it = 0; it < ROWS * kChunks / kThreads; ++it) {
      const int i = threadIdx.x + it * kThreads;
      const int r = i / kChunks, c = (i % kChunks) * 8;
      const bool valid = row0 + r < valid_end;
      ptx::cp_async_16(smem + r * ld + c, valid ? g + (int64_t)(row0 + r) * stride + c : g, valid);
    }
  } else {
    const T zero = from_float<T>(0.f);
    for (int i = threadIdx.x; i < ROWS * D; i += kThreads) {
      const int r = i / D, c = i % D;
      smem[r * ld + c] = row0 + r < valid_end ? g[(int64_t)(row0 + r) * stride + c] : zero;
    }
  }
}

// One warp: the A fragments of its 16 rows x D (row-major smem, rows `rows`): frag[k] covers
// columns [16k, 16k + 16).
template <int D, typename T>
__device__ __forceinline__ void load_a_frags(uint32_t (&frag)[D / 16][4], const T* rows, int lane) {
  constexpr int ld = D + kPad;
  const T* at = rows + (lane % 8 + (lane / 8) % 2 * 8) * ld + lane / 16 * 8;
#pragma unroll
  for (int k = 0; k < D / 16; ++k) ptx::ldmatrix_x4(frag[k], at + k * 16);
}

// One warp: acc[16][N] += A[16][K] (register fragments) . B[N][K]^T, B row-major in smem with
// ld = K + kPad (keys x dims: S = Q K^T). ldmatrix (no .trans) of B's rows gives the "col" B
// fragment directly.
template <typename T, int N, int K>
__device__ __forceinline__ void gemm_abt(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4], const T* b,
                                         int lane) {
  constexpr int ld = K + kPad;
  const T* at = b + (lane % 8 + lane / 16 * 8) * ld + (lane / 8) % 2 * 8;
#pragma unroll
  for (int k = 0; k < K / 16; ++k) {
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      uint32_t f[4];
      ptx::ldmatrix_x4(f, at + n * 16 * ld + k * 16);
      ptx::mma_m16n8k16<T>(acc[2 * n], a[k], {f[0], f[1]});
      ptx::mma_m16n8k16<T>(acc[2 * n + 1], a[k], {f[2], f[3]});
    }
  }
}

// One warp: acc[16][N] += P[16][K] . B[K][N], P an fp32 register tile (float p[K / 8][4], the
// accumulator of an earlier GEMM, rounded to T here) and B row-major in smem with ld = N + kPad
// (keys x dims: O += P V). ldmatrix.trans turns B's rows into the "col" B fragment.
template <typename T, int N, int K>
__device__ __forceinline__ void gemm_pb(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const T* b, int lane) {
  constexpr int ld = N + kPad;
  const T* at = b + (lane % 8 + (lane / 8) % 2 * 8) * ld + lane / 16 * 8;
#pragma unroll
  for (int k = 0; k < K / 16; ++k) {
    // The C fragments of columns [16k, 16k + 8) and [16k + 8, 16k + 16) are the A fragment of k.
    const uint32_t a[4] = {pack2<T>(p[2 * k][0], p[2 * k][1]), pack2<T>(p[2 * k][2], p[2 * k][3]),
                           pack2<T>(p[2 * k + 1][0], p[2 * k + 1][1]), pack2<T>(p[2 * k + 1][2], p[2 * k + 1][3])};
#pragma unroll
    for (int n = 0; n < N / 16; ++n) {
      uint32_t f[4];
      ptx::ldmatrix_x4_trans(f, at + k * 16 * ld + n * 16);
      ptx::mma_m16n8k16<T>(acc[2 * n], a, {f[0], f[1]});
      ptx::mma_m16n8k16<T>(acc[2 * n + 1], a, {f[2], f[3]});
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// One warp: write its 16 x D accumulator times `factor` to rows [row0, row0 + 16) of a [n, D]
// slice (rows past n dropped). The tile goes through the warp's own 16 smem rows `stage` (rows
// of D + kPad, which only this warp reads), so that each lane then stores 16 contiguous bytes.
template <typename T, int D>
__device__ __forceinline__ void store_warp_rows(T* g, int64_t stride, int row0, int n, const float (&acc)[D / 8][4],
                                                float factor, T* stage, bool vec, int lane) {
  constexpr int ld = D + kPad;
  const int gr = lane / 4, t = lane % 4;
  __syncwarp();  // the warp's earlier reads of `stage` are done
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    *reinterpret_cast<uint32_t*>(stage + gr * ld + 8 * j + 2 * t) = pack2<T>(acc[j][0] * factor, acc[j][1] * factor);
    *reinterpret_cast<uint32_t*>(stage + (gr + 8) * ld + 8 * j + 2 * t) =
        pack2<T>(acc[j][2] * factor, acc[j][3] * factor);
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
  if (vec) {
#pragma unroll
    for (int it = 0; it < kWarpRows * kChunks / 32; ++it) {
      const int i = lane + it * 32;
      const int r = i / kChunks, c = (i % kChunks) * 8;
      if (row0 + r < n)
        *reinterpret_cast<uint4*>(g + (int64_t)(row0 + r) * stride + c) =
            *reinterpret_cast<const uint4*>(stage + r * ld + c);
    }
  } else {
    for (int i = lane; i < kWarpRows * D; i += 32) {
      const int r = i / D, c = i % D;
      if (row0 + r < n) g[(int64_t)(row0 + r) * stride + c] = stage[r * ld + c];
    }
  }
}

// 16-byte copies need 16-byte aligned bases and row strides that are multiples of 8 elements.
inline bool vec_ok(const void* base, const int64_t* stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[0] % 8 == 0 && stride[1] % 8 == 0 &&
         stride[2] % 8 == 0;
}

// Which tensors allow 16-byte loads / stores.
struct VecFlags {
  bool q, k, v, dout, out, dq, dk, dv;
};

inline VecFlags vec_flags(const SegAttnParams& p) {
  auto ok = [](const void* base, const int64_t* stride) { return base != nullptr && vec_ok(base, stride); };
  return VecFlags{ok(p.q, p.q_stride),   ok(p.k, p.k_stride),   ok(p.v, p.v_stride),   ok(p.dout, p.dout_stride),
                  ok(p.out, p.out_stride), ok(p.dq, p.dq_stride), ok(p.dk, p.dk_stride), ok(p.dv, p.dv_stride)};
}

// Opt a kernel into more than 48 KiB of dynamic shared memory, then launch it with 4 warps.
template <typename... Args>
const char* launch(void (*kernel)(Args...), dim3 grid, int smem_bytes, cudaStream_t stream, Args... args) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  SEGATTN_LAUNCH(kernel, grid, dim3(kThreads), smem_bytes, stream, args...);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace segattn
