// Every PTX instruction the segment-attention kernels use, each behind one small device function
// (namespace segattn::ptx). The kernels call nothing else below plain CUDA C++, so the same
// source runs on a GPU (nvcc: the `asm volatile` branch below) and in the CPU emulation (an
// implementation of each function per the PTX ISA fragment tables, emu/ptx_emu.h).
//
// Fragment notation (PTX ISA, "Matrix fragments for mma.m16n8k16"): in a warp, lane l has
//   g = l / 4 (groupID) and t = l % 4 (threadID_in_group).
// A u32 register holds two 16-bit values; the one with the lower column (or k) index sits in the
// low half.
#pragma once

#include <stdint.h>

#if defined(SEGATTN_EMU)
#include "emu/ptx_emu.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace segattn {
namespace ptx {

// D += A·B, fp32 accumulators: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32.
// T is __half or __nv_bfloat16.
//   A 16x16 (row-major), a[4]:  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                               a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B 16x8 (k x n, "col"), b[2]: b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   C/D 16x8 fp32, acc[4]:      acc[0], acc[1] = C[g][2t], C[g][2t+1]
//                               acc[2], acc[3] = C[g+8][2t], C[g+8][2t+1]
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&acc)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: loads 1, 2 or 4 matrices of 8x8
// 16-bit values. Lane l passes the address of row (l % 8) of matrix (l / 8) (x2: lanes 0-15's
// addresses are used, x1: lanes 0-7); each row is 16 contiguous, 16-byte aligned bytes.
//   plain:  r[i] = M_i[g][2t, 2t+1]      (row g of matrix i, the pair of columns 2t, 2t+1)
//   .trans: r[i] = M_i[2t][g], M_i[2t+1][g]   (column g, rows 2t, 2t+1: M_i transposed)
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(smem_row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem_row)));
}

// cp.async.cg.shared.global [dst], [src], 16, src_size: copies 16 bytes global -> shared without
// passing through registers; src_size 0 (valid = false) writes 16 zero bytes and reads nothing.
// Both addresses 16-byte aligned. The copy lands after the cp_async_wait that covers its group.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_size));
}

// cp.async.commit_group: the copies issued since the last commit form one group.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// cp.async.wait_group N: wait until at most the N most recent groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace ptx
}  // namespace segattn

#endif  // SEGATTN_EMU
