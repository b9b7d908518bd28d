// A standalone host program around the kernels' C API (segattn.h), for the emulated builds that
// cannot load into Python: the sanitizer builds (ASan / UBSan / TSan) and the mutation tests.
//
//   driver IN OUT
//
// IN:  int32 B, H, Nq, Nk, D, dtype (0 fp16, 1 bf16), inclusive, backward (0 / 1); float32 scale;
//      then q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, D], dout [B, H, Nq, D] (16-bit),
//      seg_q [B, Nq], seg_k [B, Nk] (int32), all contiguous.
// OUT: out [B, H, Nq, D] (16-bit), lse [B, H, Nq] (fp32) and, with backward, dq, dk, dv (16-bit).
//
// Every tensor lives in a heap block of exactly its size, so AddressSanitizer flags any access
// past its end. delta = rowsum(dout * out) is computed here in fp32, as the torch binding does.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <memory>
#include <vector>

#include "segattn.h"

namespace {

float half_to_float(uint16_t h, int bf16) {
  uint32_t bits;
  if (bf16) {
    bits = (uint32_t)h << 16;
  } else {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) {
      bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
      bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else {
      const float mag = (float)man * 5.9604644775390625e-08f;
      return sign ? -mag : mag;
    }
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

struct Buffer {
  std::unique_ptr<unsigned char[]> data;
  size_t bytes = 0;
};

Buffer alloc(size_t bytes) {
  Buffer b;
  b.bytes = bytes;
  b.data.reset(new unsigned char[bytes ? bytes : 1]);
  return b;
}

void read_exact(FILE* f, void* dst, size_t bytes) {
  if (fread(dst, 1, bytes, f) != bytes) {
    fprintf(stderr, "driver: input file too short\n");
    exit(2);
  }
}

void contiguous_strides(int64_t* s, int heads, int n, int d) {
  s[0] = (int64_t)heads * n * d;
  s[1] = (int64_t)n * d;
  s[2] = d;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  if (!in) {
    perror(argv[1]);
    return 2;
  }
  int32_t hdr[8];
  float scale;
  read_exact(in, hdr, sizeof hdr);
  read_exact(in, &scale, sizeof scale);
  const int B = hdr[0], H = hdr[1], Nq = hdr[2], Nk = hdr[3], D = hdr[4], bf16 = hdr[5], inclusive = hdr[6],
            backward = hdr[7];
  const size_t nq_el = (size_t)B * H * Nq * D, nk_el = (size_t)B * H * Nk * D;
  Buffer q = alloc(nq_el * 2), k = alloc(nk_el * 2), v = alloc(nk_el * 2), dout = alloc(nq_el * 2);
  Buffer seg_q = alloc((size_t)B * Nq * 4), seg_k = alloc((size_t)B * Nk * 4);
  for (Buffer* b : {&q, &k, &v, &dout, &seg_q, &seg_k}) read_exact(in, b->data.get(), b->bytes);
  fclose(in);

  SegAttnParams p{};
  p.q = q.data.get();
  p.k = k.data.get();
  p.v = v.data.get();
  p.seg_q = reinterpret_cast<const int32_t*>(seg_q.data.get());
  p.seg_k = reinterpret_cast<const int32_t*>(seg_k.data.get());
  contiguous_strides(p.q_stride, H, Nq, D);
  contiguous_strides(p.k_stride, H, Nk, D);
  contiguous_strides(p.v_stride, H, Nk, D);
  p.batch = B;
  p.heads = H;
  p.nq = Nq;
  p.nk = Nk;
  p.head_dim = D;
  p.scale = scale;
  p.inclusive = inclusive;
  p.dtype = bf16 ? SEGATTN_BF16 : SEGATTN_F16;
  if (!segattn_supports_head_dim(D)) {
    fprintf(stderr, "driver: head dim %d is not supported\n", D);
    return 2;
  }

  Buffer out = alloc(nq_el * 2), lse = alloc((size_t)B * H * Nq * 4);
  p.out = out.data.get();
  contiguous_strides(p.out_stride, H, Nq, D);
  p.lse = reinterpret_cast<float*>(lse.data.get());
  if (const char* err = segattn_forward(&p, nullptr)) {
    fprintf(stderr, "driver: forward failed: %s\n", err);
    return 1;
  }

  Buffer dq, dk, dv, delta;
  if (backward) {
    delta = alloc((size_t)B * H * Nq * 4);
    float* dl = reinterpret_cast<float*>(delta.data.get());
    const uint16_t* o16 = reinterpret_cast<const uint16_t*>(out.data.get());
    const uint16_t* d16 = reinterpret_cast<const uint16_t*>(dout.data.get());
    for (size_t row = 0; row < (size_t)B * H * Nq; ++row) {
      float s = 0.f;
      for (int c = 0; c < D; ++c) s += half_to_float(o16[row * D + c], bf16) * half_to_float(d16[row * D + c], bf16);
      dl[row] = s;
    }
    dq = alloc(nq_el * 2);
    dk = alloc(nk_el * 2);
    dv = alloc(nk_el * 2);
    p.dout = dout.data.get();
    contiguous_strides(p.dout_stride, H, Nq, D);
    p.delta = dl;
    p.dq = dq.data.get();
    p.dk = dk.data.get();
    p.dv = dv.data.get();
    contiguous_strides(p.dq_stride, H, Nq, D);
    contiguous_strides(p.dk_stride, H, Nk, D);
    contiguous_strides(p.dv_stride, H, Nk, D);
    if (const char* err = segattn_backward(&p, nullptr)) {
      fprintf(stderr, "driver: backward failed: %s\n", err);
      return 1;
    }
  }

  FILE* o = fopen(argv[2], "wb");
  if (!o) {
    perror(argv[2]);
    return 2;
  }
  std::vector<Buffer*> outs = {&out, &lse};
  if (backward) outs.insert(outs.end(), {&dq, &dk, &dv});
  for (Buffer* b : outs) fwrite(b->data.get(), 1, b->bytes, o);
  fclose(o);
  return 0;
}
