// Self-test of the emulated PTX primitives (ptx.cuh under SEGATTN_EMU) against plain host code:
// mma.m16n8k16 against a plain GEMM, with fragments built straight from the PTX ISA tables and
// fed by ldmatrix; ldmatrix x1 / x2 / x4 (.trans) against a plain copy / transpose; cp.async
// against its deferred-completion contract. Prints one "PASS name" / "FAIL name: ..." line per
// check; exits 1 if any failed. Built and run by tests/test_cuda_emu.py.
#include "cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "launch.cuh"
#include "ptx.cuh"

namespace {

using segattn::ptx::cp_async_16;
using segattn::ptx::cp_async_commit;
using segattn::ptx::cp_async_wait;

int g_failures = 0;

void report(bool ok, const char* name, const char* detail = "") {
  printf("%s %s%s%s\n", ok ? "PASS" : "FAIL", name, ok ? "" : ": ", ok ? "" : detail);
  if (!ok) ++g_failures;
}

template <typename T> uint16_t bits(T x) {
  uint16_t b;
  memcpy(&b, &x, 2);
  return b;
}
template <typename T> T from_bits(uint16_t b) {
  T x;
  memcpy(&x, &b, 2);
  return x;
}
template <typename T> T to_t(float x);
template <> __half to_t<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 to_t<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> float to_f(T x);
template <> float to_f<__half>(__half x) { return __half2float(x); }
template <> float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

uint32_t pack(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

// ---------------------------------------------------------------------------------------------
// mma with fragments built per the PTX ISA table (no ldmatrix involved)
// ---------------------------------------------------------------------------------------------
// a: A [16][16] row-major, b: B [16][8] (k x n) row-major, c: C [16][8]; d: D [16][8] out.
template <typename T>
__global__ void mma_table_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto A = [&](int r, int k) { return bits(a[r * 16 + k]); };
  auto B = [&](int k, int n) { return bits(b[k * 8 + n]); };
  const uint32_t fa[4] = {pack(A(g, 2 * t), A(g, 2 * t + 1)), pack(A(g + 8, 2 * t), A(g + 8, 2 * t + 1)),
                          pack(A(g, 2 * t + 8), A(g, 2 * t + 9)), pack(A(g + 8, 2 * t + 8), A(g + 8, 2 * t + 9))};
  const uint32_t fb[2] = {pack(B(2 * t, g), B(2 * t + 1, g)), pack(B(2 * t + 8, g), B(2 * t + 9, g))};
  float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  segattn::ptx::mma_m16n8k16<T>(acc, fa, fb);
  d[g * 8 + 2 * t] = acc[0];
  d[g * 8 + 2 * t + 1] = acc[1];
  d[(g + 8) * 8 + 2 * t] = acc[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// The same product with operands through shared memory and ldmatrix, as a kernel loads them:
// A row-major (x4), B once as B [k][n] row-major (x2.trans) and once as B^T [n][k] (x2).
constexpr int kLd = 24;  // padded row of 16-bit values (48 bytes: rows stay 16-byte aligned)
template <typename T>
__global__ void mma_ldmatrix_kernel(const T* a, const T* b, const float* c, float* d_trans, float* d_plain) {
  SEGATTN_DYNAMIC_SMEM(unsigned char, smem);
  T* s_a = reinterpret_cast<T*>(smem);            // [16][kLd]
  T* s_b = s_a + 16 * kLd;                        // [16 k][kLd]
  T* s_bt = s_b + 16 * kLd;                       // [8 n][kLd]
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  for (int i = lane; i < 256; i += 32) s_a[(i / 16) * kLd + i % 16] = a[i];
  for (int i = lane; i < 128; i += 32) {
    s_b[(i / 8) * kLd + i % 8] = b[i];
    s_bt[(i % 8) * kLd + i / 8] = b[i];
  }
  __syncwarp();
  // x4 over A: matrix m = lane / 8 is A[8 (m % 2) ..][8 (m / 2) ..], which is a[0..3]'s order.
  const int m = lane / 8, r = lane % 8;
  uint32_t fa[4];
  segattn::ptx::ldmatrix_x4(fa, s_a + (8 * (m % 2) + r) * kLd + 8 * (m / 2));
  uint32_t fb[2], fbt[2];
  segattn::ptx::ldmatrix_x2_trans(fb, s_b + (8 * (m % 2) + r) * kLd);  // rows k of B: b[0] k 0-7, b[1] k 8-15
  segattn::ptx::ldmatrix_x2(fbt, s_bt + r * kLd + 8 * (m % 2));       // rows n of B^T, k halves
  for (int pass = 0; pass < 2; ++pass) {
    float acc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    segattn::ptx::mma_m16n8k16<T>(acc, fa, pass == 0 ? fb : fbt);
    float* d = pass == 0 ? d_trans : d_plain;
    d[g * 8 + 2 * t] = acc[0];
    d[g * 8 + 2 * t + 1] = acc[1];
    d[(g + 8) * 8 + 2 * t] = acc[2];
    d[(g + 8) * 8 + 2 * t + 1] = acc[3];
  }
}

template <typename T>
void test_mma(const char* tname) {
  // Values k / 8 with small k: every product and partial sum is exact in fp32, so the result
  // must equal the plain GEMM exactly.
  std::vector<T> a(256), b(128);
  std::vector<float> c(128), ref(128), d(128, -1.f), d2(128, -1.f), d3(128, -1.f);
  unsigned s = 12345u;
  auto rnd = [&] { s = s * 1103515245u + 12345u; return (float)((int)((s >> 16) % 17) - 8) / 8.f; };
  for (auto& x : a) x = to_t<T>(rnd());
  for (auto& x : b) x = to_t<T>(rnd());
  for (auto& x : c) x = rnd() * 4.f;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double sum = c[i * 8 + j];
      for (int k = 0; k < 16; ++k) sum += (double)to_f(a[i * 16 + k]) * to_f(b[k * 8 + j]);
      ref[i * 8 + j] = (float)sum;
    }
  char name[96], detail[160];
  SEGATTN_LAUNCH(mma_table_kernel<T>, dim3(1), dim3(32), 0, nullptr, a.data(), b.data(), c.data(), d.data());
  int bad = -1;
  for (int i = 0; i < 128 && bad < 0; ++i)
    if (d[i] != ref[i]) bad = i;
  snprintf(name, sizeof name, "mma_m16n8k16<%s> (PTX-table fragments) == plain GEMM", tname);
  snprintf(detail, sizeof detail, "D[%d][%d] = %g, GEMM %g", bad / 8, bad % 8, bad < 0 ? 0. : d[bad],
           bad < 0 ? 0. : ref[bad]);
  report(bad < 0, name, detail);

  const int smem = (16 + 16 + 8) * kLd * 2;
  SEGATTN_LAUNCH(mma_ldmatrix_kernel<T>, dim3(1), dim3(32), smem, nullptr, a.data(), b.data(), c.data(), d2.data(),
                 d3.data());
  for (int pass = 0; pass < 2; ++pass) {
    const std::vector<float>& dd = pass == 0 ? d2 : d3;
    bad = -1;
    for (int i = 0; i < 128 && bad < 0; ++i)
      if (dd[i] != ref[i]) bad = i;
    snprintf(name, sizeof name, "mma_m16n8k16<%s> fed by ldmatrix_x4 + ldmatrix_x2%s == plain GEMM", tname,
             pass == 0 ? "_trans (B [k][n])" : " (B^T [n][k])");
    snprintf(detail, sizeof detail, "D[%d][%d] = %g, GEMM %g", bad / 8, bad % 8, bad < 0 ? 0. : dd[bad],
             bad < 0 ? 0. : ref[bad]);
    report(bad < 0, name, detail);
  }
}

// ---------------------------------------------------------------------------------------------
// ldmatrix against a plain copy / transpose
// ---------------------------------------------------------------------------------------------
// m: 4 matrices [4][8][8] of distinct 16-bit values; out [4][8][8]: lane (g, t) writes its two
// halves of register i to out[i][g][2t], out[i][g][2t + 1]. Plain ldmatrix must then reproduce
// the matrices, .trans their transposes. Lanes whose address is unused pass nullptr.
template <int COUNT, bool TRANS>
__global__ void ldmatrix_kernel(const uint16_t* m, uint16_t* out) {
  SEGATTN_DYNAMIC_SMEM(uint16_t, smem);
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  // Matrix i, row r at smem + (8 i + r) * kLd: rows of one matrix need not be contiguous.
  for (int i = lane; i < 4 * 64; i += 32) smem[(i / 8) * kLd + i % 8] = m[i];
  __syncwarp();
  const void* row = lane < 8 * COUNT ? smem + lane * kLd : nullptr;
  uint32_t r[COUNT];
  if (COUNT == 1) {
    segattn::ptx::ldmatrix_x1(reinterpret_cast<uint32_t(&)[1]>(r), row);
  } else if (COUNT == 2) {
    if (TRANS)
      segattn::ptx::ldmatrix_x2_trans(reinterpret_cast<uint32_t(&)[2]>(r), row);
    else
      segattn::ptx::ldmatrix_x2(reinterpret_cast<uint32_t(&)[2]>(r), row);
  } else {
    if (TRANS)
      segattn::ptx::ldmatrix_x4_trans(reinterpret_cast<uint32_t(&)[4]>(r), row);
    else
      segattn::ptx::ldmatrix_x4(reinterpret_cast<uint32_t(&)[4]>(r), row);
  }
  for (int i = 0; i < COUNT; ++i) {
    out[i * 64 + g * 8 + 2 * t] = (uint16_t)(r[i] & 0xffffu);
    out[i * 64 + g * 8 + 2 * t + 1] = (uint16_t)(r[i] >> 16);
  }
}

template <int COUNT, bool TRANS>
void test_ldmatrix() {
  std::vector<uint16_t> m(256), out(256, 0xdead);
  for (int i = 0; i < 256; ++i) m[i] = (uint16_t)(1000 + i);
  SEGATTN_LAUNCH((ldmatrix_kernel<COUNT, TRANS>), dim3(1), dim3(32), 32 * kLd * 2, nullptr, m.data(), out.data());
  int bad = -1;
  for (int i = 0; i < COUNT && bad < 0; ++i)
    for (int rr = 0; rr < 8 && bad < 0; ++rr)
      for (int cc = 0; cc < 8 && bad < 0; ++cc) {
        const uint16_t want = TRANS ? m[i * 64 + cc * 8 + rr] : m[i * 64 + rr * 8 + cc];  // plain transpose
        if (out[i * 64 + rr * 8 + cc] != want) bad = i * 64 + rr * 8 + cc;
      }
  char name[64], detail[96];
  snprintf(name, sizeof name, "ldmatrix_x%d%s == plain %s", COUNT, TRANS ? "_trans" : "", TRANS ? "transpose" : "copy");
  snprintf(detail, sizeof detail, "matrix %d element (%d, %d)", bad / 64, bad % 64 / 8, bad % 8);
  report(bad < 0, name, detail);
}

// ---------------------------------------------------------------------------------------------
// cp.async: lands at the covering wait, poison before; src_size 0 zero-fills
// ---------------------------------------------------------------------------------------------
__global__ void cp_async_kernel(const uint32_t* src, uint32_t* seen) {
  SEGATTN_DYNAMIC_SMEM(uint32_t, smem);  // 3 chunks of 16 bytes per thread
  uint32_t* mine = smem + threadIdx.x * 12;
  const uint32_t* from = src + threadIdx.x * 8;
  cp_async_16(mine, from, true);
  cp_async_commit();                    // group 0
  cp_async_16(mine + 4, from + 4, true);
  cp_async_16(mine + 8, from, false);   // zero-fill
  cp_async_commit();                    // group 1
  uint32_t* s = seen + threadIdx.x * 36;
  for (int i = 0; i < 12; ++i) s[i] = mine[i];       // before any wait: all poison
  cp_async_wait<1>();
  for (int i = 0; i < 12; ++i) s[12 + i] = mine[i];  // group 0 landed, group 1 not
  cp_async_wait<0>();
  for (int i = 0; i < 12; ++i) s[24 + i] = mine[i];  // all landed
}

void test_cp_async() {
  const int threads = 32;
  std::vector<uint32_t> src(threads * 8), seen(threads * 36);
  for (size_t i = 0; i < src.size(); ++i) src[i] = 0x10000u + (uint32_t)i;
  SEGATTN_LAUNCH(cp_async_kernel, dim3(1), dim3(threads), threads * 48, nullptr, src.data(), seen.data());
  bool poison = true, partial = true, done = true;
  for (int t = 0; t < threads; ++t) {
    const uint32_t* s = &seen[t * 36];
    const uint32_t* from = &src[t * 8];
    for (int i = 0; i < 12; ++i) poison &= s[i] == 0xFFFFFFFFu;
    for (int i = 0; i < 4; ++i) partial &= s[12 + i] == from[i];
    for (int i = 4; i < 12; ++i) partial &= s[12 + i] == 0xFFFFFFFFu;
    for (int i = 0; i < 8; ++i) done &= s[24 + i] == from[i];
    for (int i = 8; i < 12; ++i) done &= s[24 + i] == 0u;
  }
  report(poison, "cp.async destination reads 0xFF (NaN) before any wait");
  report(partial, "cp_async_wait<1> lands the older group only");
  report(done, "cp_async_wait<0> lands every group; src_size 0 writes zeros");
}

}  // namespace

int main() {
  test_mma<__half>("f16");
  test_mma<__nv_bfloat16>("bf16");
  test_ldmatrix<1, false>();
  test_ldmatrix<2, false>();
  test_ldmatrix<4, false>();
  test_ldmatrix<2, true>();
  test_ldmatrix<4, true>();
  test_cp_async();
  if (cudaGetLastError() != cudaSuccess) report(false, "launches", "a launch failed");
  return g_failures ? 1 : 0;
}
