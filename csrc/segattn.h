// Segment attention: the C launch API between the CUDA kernels and the torch binding.
//
// The kernels (*.cu) include only CUDA headers and this file; the binding (binding.cpp) includes
// torch and this file. Neither side sees the other's headers, so each compiles on its own.
//
// Layouts: q [B, H, Nq, D], k / v [B, H, Nk, D] and the outputs [B, H, N, D] are given by a base
// pointer plus element strides of (batch, head, token); the last dim is contiguous.
// seg_q [B, Nq] and seg_k [B, Nk] are contiguous, int32, non-decreasing per row. lse and delta
// are contiguous fp32 [B, H, Nq].
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SEGATTN_F16 = 0, SEGATTN_BF16 = 1 } SegAttnDtype;

typedef struct SegAttnParams {
  // Inputs of both passes.
  const void* q;
  const void* k;
  const void* v;
  const int32_t* seg_q;
  const int32_t* seg_k;
  int64_t q_stride[3], k_stride[3], v_stride[3];  // (batch, head, token), in elements
  int batch, heads, nq, nk, head_dim;
  float scale;    // softmax scale applied to q . k
  int inclusive;  // 1: key j visible iff seg_k[j] <= seg_q[i]; 0: iff seg_k[j] < seg_q[i]
  SegAttnDtype dtype;

  // Forward outputs; backward inputs.
  void* out;
  int64_t out_stride[3];
  float* lse;  // natural-log row sums of exp(scores); +inf for rows that see no key

  // Backward only.
  const void* dout;
  int64_t dout_stride[3];
  const float* delta;  // rowsum(dout * out) in fp32
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_stride[3], dk_stride[3], dv_stride[3];
} SegAttnParams;

// Head dims the kernels are instantiated for.
int segattn_supports_head_dim(int head_dim);

// Launch on `stream` (a cudaStream_t). Return NULL on success, else a static error message.
const char* segattn_forward(const SegAttnParams* params, void* stream);
const char* segattn_backward(const SegAttnParams* params, void* stream);

#ifdef __cplusplus
}
#endif
