// torch binding of the segment-attention kernels: tensor checks, allocation, the C launch API.
//
// Compiled by the host compiler against torch's headers only (no CUDA headers): the kernels sit
// behind segattn.h. The caller passes the CUDA stream to launch on (torch's current stream for
// the tensors' device) and makes that device current.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "segattn.h"

namespace {

void check_qkv_like(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must be [B, H, N, D]; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              " must be fp16 or bf16; got ", t.scalar_type());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, name, " must have a contiguous last dim; got strides ",
              t.strides());
}

void set_strides(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 3; ++i) dst[i] = t.stride(i);
}

// Fills the fields shared by both passes.
SegAttnParams common_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seg_q,
                            const at::Tensor& seg_k, bool inclusive, double scale) {
  check_qkv_like(q, "q");
  check_qkv_like(k, "k");
  check_qkv_like(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k and v must be [B, H, Nk, D] like q; got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(segattn_supports_head_dim(static_cast<int>(q.size(3))), "head dim must be 32, 64 or 128; got ",
              q.size(3));
  for (const at::Tensor* s : {&seg_q, &seg_k}) {
    TORCH_CHECK(s->scalar_type() == at::kInt && s->is_contiguous() && s->dim() == 2 && s->device() == q.device(),
                "seg_q / seg_k must be contiguous int32 [B, N] on q's device");
  }
  TORCH_CHECK(seg_q.size(0) == q.size(0) && seg_q.size(1) == q.size(2), "seg_q must be [B, Nq]; got ", seg_q.sizes());
  TORCH_CHECK(seg_k.size(0) == q.size(0) && seg_k.size(1) == k.size(2), "seg_k must be [B, Nk]; got ", seg_k.sizes());
  for (int64_t n : {q.size(0), q.size(1), q.size(2), k.size(2)})
    TORCH_CHECK(n <= INT32_MAX, "sizes must fit in int32; got ", n);

  SegAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.seg_q = seg_q.data_ptr<int32_t>();
  p.seg_k = seg_k.data_ptr<int32_t>();
  set_strides(p.q_stride, q);
  set_strides(p.k_stride, k);
  set_strides(p.v_stride, v);
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.nq = static_cast<int>(q.size(2));
  p.nk = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.inclusive = inclusive ? 1 : 0;
  p.dtype = q.scalar_type() == at::kBFloat16 ? SEGATTN_BF16 : SEGATTN_F16;
  return p;
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// -> [out [B, H, Nq, D] (q's dtype), lse [B, H, Nq] fp32]
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& seg_q, const at::Tensor& seg_k, bool inclusive, double scale,
                                int64_t stream) {
  SegAttnParams p = common_params(q, k, v, seg_q, seg_k, inclusive, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  set_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
  const char* err = segattn_forward(&p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "segment attention forward kernel failed: ", err);
  return {out, lse};
}

// -> [dq, dk, dv], contiguous, in q's dtype.
std::vector<at::Tensor> backward(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& seg_q, const at::Tensor& seg_k, bool inclusive, double scale,
                                 int64_t stream) {
  SegAttnParams p = common_params(q, k, v, seg_q, seg_k, inclusive, scale);
  // Incoming gradients may be expanded or otherwise strided; the kernels need a unit last stride.
  const at::Tensor dout = dout_in.stride(-1) == 1 ? dout_in : dout_in.contiguous();
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "dout and out must be like q: ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be contiguous fp32");
  // delta_i = dout_i . out_i, the softmax-backward row term, in fp32 (on the current stream).
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  p.dout = dout.data_ptr();
  set_strides(p.dout_stride, dout);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  set_strides(p.dq_stride, dq);
  set_strides(p.dk_stride, dk);
  set_strides(p.dv_stride, dv);
  const char* err = segattn_backward(&p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "segment attention backward kernel failed: ", err);
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Segment-causal attention kernels (fp16/bf16, head dims 32/64/128)";
  m.def("forward", &forward, "segment attention forward -> [out, lse]", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("seg_q"), py::arg("seg_k"), py::arg("inclusive"), py::arg("scale"), py::arg("stream"));
  m.def("backward", &backward, "segment attention backward -> [dq, dk, dv]", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("seg_q"), py::arg("seg_k"),
        py::arg("inclusive"), py::arg("scale"), py::arg("stream"));
}
