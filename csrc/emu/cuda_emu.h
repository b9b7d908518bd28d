// CUDA on the CPU: the header force-included (g++ -include) ahead of a kernel source compiled as
// plain C++ (-x c++ -DSEGATTN_EMU). The kernel source stays as it is; this header supplies what
// nvcc would: the CUDA keywords, threadIdx / blockIdx / blockDim / gridDim, __syncthreads,
// __syncwarp, the warp shuffles, and the launch used by SEGATTN_LAUNCH (launch_emu.h). The real
// cuda_runtime.h / cuda_fp16.h / cuda_bf16.h come from the CUDA toolkit's include directory in
// host mode, so __half / __nv_bfloat16 round exactly as on the device.
//
// Execution model (emu_runtime.cpp): blocks run one after another; the CUDA threads of a block
// run as CPU execution contexts, either fibers on one OS thread (default: fast, deterministic,
// each fiber runs until it reaches a barrier) or one std::thread each (SEGATTN_EMU_MODE=threads,
// and always under ThreadSanitizer, which then sees every cross-thread access). Dynamic shared
// memory is a per-launch buffer filled with 0xFF before each block, so a read of shared memory
// that nothing wrote is NaN. Warp-collective operations (shuffles, ldmatrix, mma) exchange values
// through a per-warp slot buffer and a warp barrier; only full-warp masks are emulated.
#pragma once

#ifndef SEGATTN_EMU
#define SEGATTN_EMU 1
#endif

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstddef>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// The keywords: host_defines.h (host mode) turns them into attributes g++ warns about.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__ static const
// Static __shared__ arrays: one per kernel function, which is right because blocks run one
// after another. Dynamic shared memory goes through SEGATTN_DYNAMIC_SMEM (launch_emu.h).
#define __shared__ static
#define __launch_bounds__(...)

namespace segemu {

struct Block;

// One CUDA thread's identity, as seen by the code it runs.
struct ThreadCtx {
  uint3 thread_idx;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  int lane, warp;
  Block* block;
  void* runtime;  // the execution context (emu_runtime.cpp)
};

// The thread now running on this OS thread (a fiber switch updates it). A call, not the
// thread_local itself: the kernels' TUs then never cache its address across a fiber switch.
ThreadCtx* current();

const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_smem();
size_t dynamic_smem_bytes();

void syncthreads();
void syncwarp(unsigned mask);
// Warp-collective exchange: every lane of the warp passes `bytes` (<= kSlotBytes) and gets back
// the base of the warp's 32 slots (slot l at base + l * kSlotBytes), valid until its next
// collective operation.
constexpr int kSlotBytes = 64;
const unsigned char* warp_exchange(const void* mine, size_t bytes, unsigned mask);

// Abort with a message naming the block and thread (a kernel fault).
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Launch: run `body` as every thread of every block of the grid. `func` identifies the kernel
// (cudaFuncSetAttribute's limit on dynamic shared memory applies to it).
void run_grid(const void* func, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

template <typename... P, typename... A>
void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes, A&&... args) {
  // The arguments converted to the kernel's parameter types once, as a launch does; each CUDA
  // thread then gets its own copy (kernel parameters are per thread).
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes,
           [&params, kernel] { std::apply(kernel, params); });
}

}  // namespace segemu

#define threadIdx (::segemu::current()->thread_idx)
#define blockIdx (::segemu::block_idx())
#define blockDim (::segemu::block_dim())
#define gridDim (::segemu::grid_dim())
#ifndef warpSize
#define warpSize 32
#endif

inline void __syncthreads() { ::segemu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::segemu::syncwarp(mask); }
inline void __threadfence_block() {}

namespace segemu {
// Source lane of a shuffle within segments of `width` lanes (out of range: the lane's own value).
template <typename T>
T shfl_from(unsigned mask, T var, int src, bool own) {
  static_assert(sizeof(T) <= kSlotBytes && std::is_trivially_copyable<T>::value, "shuffle of this type");
  const unsigned char* slots = warp_exchange(&var, sizeof(T), mask);
  if (own) return var;
  T out;
  memcpy(&out, slots + src * kSlotBytes, sizeof(T));
  return out;
}
}  // namespace segemu

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int lane = ::segemu::current()->lane;
  return ::segemu::shfl_from(mask, var, (lane / width) * width + (src_lane % width), false);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = ::segemu::current()->lane, src = lane ^ lane_mask;
  return ::segemu::shfl_from(mask, var, src, src / width != lane / width || src >= 32);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = ::segemu::current()->lane;
  return ::segemu::shfl_from(mask, var, lane + (int)delta, (lane % width) + (int)delta >= width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = ::segemu::current()->lane;
  return ::segemu::shfl_from(mask, var, lane - (int)delta, (lane % width) < (int)delta);
}

// Fast-math intrinsics some kernels use, at full precision.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
template <typename T> inline T __ldg(const T* p) { return *p; }

// cuda_runtime.h declares this overload for nvcc only.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, enum cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

#include "launch_emu.h"
