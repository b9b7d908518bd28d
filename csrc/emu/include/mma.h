// nvcuda::wmma for the CPU emulation (found before the toolkit's mma.h on the include path), for
// kernels on the 16x16x16 wmma API with fp32 accumulators. Math in fp32.
//
// The fragment layout is the emulation's own (wmma leaves it unspecified): lane l holds row l / 2
// of a matrix_a tile (16 values), columns 8 (l % 2) .. 8 (l % 2) + 7 of a matrix_b tile (8 x 16
// values) and the same 8 elements of that row of the accumulator. So mma_sync needs no exchange,
// and each lane reads / writes exactly the elements a real lane could: a missing __syncwarp
// between a store and another lane's load still shows. load / store check wmma's rules (256-bit
// aligned pointer, ldm a multiple of 16 bytes) and abort when they are broken.
#pragma once

#include <stdint.h>

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

template <typename T, typename Layout>
struct fragment<matrix_a, 16, 16, 16, T, Layout> {
  static constexpr int num_elements = 16;
  float x[16];  // A[l / 2][k]
};
template <typename T, typename Layout>
struct fragment<matrix_b, 16, 16, 16, T, Layout> {
  static constexpr int num_elements = 128;
  float x[128];  // x[16 j + k] = B[k][8 (l % 2) + j]
};
template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
  static constexpr int num_elements = 8;
  float x[8];  // C[l / 2][8 (l % 2) + j]
};

namespace detail {
inline int lane() { return ::segemu::current()->lane; }
template <typename T>
inline void check(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::segemu::fault("wmma %s: pointer %p is not 256-bit aligned", what, (const void*)p);
  if ((ldm * sizeof(T)) % 16 != 0)
    ::segemu::fault("wmma %s: ldm %u is not a multiple of 16 bytes", what, ldm);
}
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace detail

template <typename U, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<U, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = detail::to_f(v);
}

template <typename T, typename L>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check(p, ldm, "load_matrix_sync(matrix_a)");
  const int r = detail::lane() / 2;
  for (int k = 0; k < 16; ++k)
    f.x[k] = detail::to_f(std::is_same<L, row_major>::value ? p[r * ldm + k] : p[k * ldm + r]);
}

template <typename T, typename L>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  detail::check(p, ldm, "load_matrix_sync(matrix_b)");
  const int n0 = 8 * (detail::lane() % 2);
  for (int j = 0; j < 8; ++j)
    for (int k = 0; k < 16; ++k)
      f.x[16 * j + k] =
          detail::to_f(std::is_same<L, row_major>::value ? p[k * ldm + n0 + j] : p[(n0 + j) * ldm + k]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::check(p, ldm, "load_matrix_sync(accumulator)");
  const int r = detail::lane() / 2, n0 = 8 * (detail::lane() % 2);
  for (int j = 0; j < 8; ++j) f.x[j] = layout == mem_row_major ? p[r * ldm + n0 + j] : p[(n0 + j) * ldm + r];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check(p, ldm, "store_matrix_sync");
  const int r = detail::lane() / 2, n0 = 8 * (detail::lane() % 2);
  for (int j = 0; j < 8; ++j) (layout == mem_row_major ? p[r * ldm + n0 + j] : p[(n0 + j) * ldm + r]) = f.x[j];
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[8];
  for (int j = 0; j < 8; ++j) {
    float sum = c.x[j];
    for (int k = 0; k < 16; ++k) sum += a.x[k] * b.x[16 * j + k];
    out[j] = sum;
  }
  for (int j = 0; j < 8; ++j) d.x[j] = out[j];
}

}  // namespace wmma
}  // namespace nvcuda
