// The emulation of ptx.cuh (namespace segattn::ptx): each PTX instruction the kernels use,
// implemented per the PTX ISA's fragment tables ("Matrix Fragments for mma.m16n8k16 with
// floating point type", "ldmatrix"). In a warp, lane l has g = l / 4 (groupID) and
// t = l % 4 (threadID_in_group); a u32 register holds two 16-bit values, the lower column / k
// index in the low half.
//
// Warp-collective instructions (mma, ldmatrix) exchange operands through the warp's slot buffer:
// every lane passes its registers (or its row address) and reads what it needs from the others.
// cp.async is deferred: the source is read at issue, the destination is poisoned (0xFF: NaN in
// fp16 / bf16 / fp32) and the 16 bytes land only at the cp_async_wait that covers their group, so
// a missing wait (or a missing __syncthreads after it) reads NaN.
#pragma once
#ifndef SEGATTN_EMU_PTX_EMU_H  // also a guard: a test includes a modified copy first
#define SEGATTN_EMU_PTX_EMU_H

#include <stdint.h>
#include <string.h>

#include "cuda_emu.h"

namespace segemu {

// 16-bit float -> float, by bits.
inline float bits_to_float(uint32_t bits) {
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
inline float bf16_bits_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }
inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  const float mag = (float)man * 5.9604644775390625e-08f;                   // subnormal: man * 2^-24
  return sign ? -mag : mag;
}
template <typename T> inline float half_bits_to_float(uint16_t h);
template <> inline float half_bits_to_float<__half>(uint16_t h) { return f16_bits_to_float(h); }
template <> inline float half_bits_to_float<__nv_bfloat16>(uint16_t h) { return bf16_bits_to_float(h); }

inline uint16_t lo16(uint32_t r) { return (uint16_t)(r & 0xffffu); }
inline uint16_t hi16(uint32_t r) { return (uint16_t)(r >> 16); }

// The deferred cp.async copies of the running thread (emu_runtime.cpp).
void cp_async_issue(void* smem_dst, const void* gmem_src, bool valid);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// ldmatrix with `count` matrices (x1 / x2 / x4); see segattn::ptx below.
void ldmatrix(uint32_t* r, int count, bool trans, const void* smem_row);

}  // namespace segemu

namespace segattn {
namespace ptx {

// D += A·B with fp32 accumulators (mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32).
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   acc[0], acc[1] = C[g][2t, 2t+1]          acc[2], acc[3] = C[g+8][2t, 2t+1]
// So A[r][k] sits in lane 4 (r % 8) + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k % 2,
// and B[k][n] in lane 4 n + (k % 8) / 2, register (k >= 8), half k % 2.
template <typename T>
inline void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
  } mine;
  memcpy(mine.a, a, sizeof mine.a);
  memcpy(mine.b, b, sizeof mine.b);
  const unsigned char* slots = ::segemu::warp_exchange(&mine, sizeof mine, 0xffffffffu);
  auto ops = [&](int lane) { return reinterpret_cast<const Operands*>(slots + lane * ::segemu::kSlotBytes); };
  const int lane = ::segemu::current()->lane, g = lane / 4, t = lane % 4;
  float arow[2][16], bcol[2][16];  // this lane's rows g, g + 8 of A and columns 2t, 2t + 1 of B
  for (int k = 0; k < 16; ++k) {
    const int src = (k % 8) / 2, reg_k = k >= 8 ? 2 : 0;
    for (int h = 0; h < 2; ++h) {
      const uint32_t ra = ops(4 * g + src)->a[h + reg_k];
      arow[h][k] = ::segemu::half_bits_to_float<T>(k % 2 ? ::segemu::hi16(ra) : ::segemu::lo16(ra));
      const uint32_t rb = ops(4 * (2 * t + h) + src)->b[k >= 8];
      bcol[h][k] = ::segemu::half_bits_to_float<T>(k % 2 ? ::segemu::hi16(rb) : ::segemu::lo16(rb));
    }
  }
  for (int i = 0; i < 4; ++i) {
    const float* ar = arow[i / 2];
    const float* bc = bcol[i % 2];
    float sum = acc[i];
    for (int k = 0; k < 16; ++k) sum += ar[k] * bc[k];  // products of 16-bit floats are exact in fp32
    acc[i] = sum;
  }
}

// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].shared.b16: lane l passes the address of row
// (l % 8) of matrix (l / 8); 16-byte aligned rows of 8 16-bit values.
//   plain:  r[i] = M_i[g][2t, 2t+1]         .trans: r[i] = M_i[2t][g], M_i[2t+1][g]
inline void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) { ::segemu::ldmatrix(r, 1, false, smem_row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) { ::segemu::ldmatrix(r, 2, false, smem_row); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ::segemu::ldmatrix(r, 4, false, smem_row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) { ::segemu::ldmatrix(r, 2, true, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ::segemu::ldmatrix(r, 4, true, smem_row); }

// cp.async.cg.shared.global [dst], [src], 16, valid ? 16 : 0 — deferred to the covering wait.
inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  ::segemu::cp_async_issue(smem_dst, gmem_src, valid);
}
inline void cp_async_commit() { ::segemu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::segemu::cp_async_wait(N);
}

}  // namespace ptx
}  // namespace segattn

#endif  // SEGATTN_EMU_PTX_EMU_H
