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
#ifdef SEGATTN_EMU  // the CPU emulation of the kernels (tests): CPU tensors, no stream
  TORCH_CHECK(t.is_cpu(), name, " must be a CPU tensor in the emulated build; got ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor; got ", t.device());
#endif
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

// Launches the forward into `out` (a [B, H, Nq, D] view, last dim contiguous) -> lse [B, H, Nq].
at::Tensor run_forward(SegAttnParams& p, const at::Tensor& q, const at::Tensor& out, int64_t stream) {
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  set_strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
  const char* err = segattn_forward(&p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "segment attention forward kernel failed: ", err);
  return lse;
}

// Launches the backward into dq / dk / dv ([B, H, N, D] views that together cover every element).
void run_backward(SegAttnParams& p, const at::Tensor& q, const at::Tensor& dout, const at::Tensor& out,
                  const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                  int64_t stream) {
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "dout and out must be like q: ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(dout.stride(3) == 1 || dout.size(3) <= 1, "dout must have a contiguous last dim");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "lse must be contiguous fp32 [B, H, Nq]; got ", lse.sizes());
  // delta_i = dout_i . out_i, the softmax-backward row term, in fp32 (on the current stream).
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
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
}

// -> [out [B, H, Nq, D] (q's dtype), lse [B, H, Nq] fp32]
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& seg_q, const at::Tensor& seg_k, bool inclusive, double scale,
                                int64_t stream) {
  SegAttnParams p = common_params(q, k, v, seg_q, seg_k, inclusive, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = run_forward(p, q, out, stream);
  return {out, lse};
}

// -> [dq, dk, dv], contiguous, in q's dtype.
std::vector<at::Tensor> backward(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& seg_q, const at::Tensor& seg_k, bool inclusive, double scale,
                                 int64_t stream) {
  SegAttnParams p = common_params(q, k, v, seg_q, seg_k, inclusive, scale);
  // Incoming gradients may be expanded or otherwise strided; the kernels need a unit last stride.
  const at::Tensor dout = dout_in.dim() == 4 && dout_in.stride(-1) == 1 ? dout_in : dout_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  run_backward(p, q, dout, out, lse, dq, dk, dv, stream);
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------------------
// The models' fused projection layouts, read and written in place by strides (no head copies):
// qkv [B, N, 3*H*D] (q | k | v, each head-major) or q [B, Nq, H*D] with kv [B, Nk, 2*H*D]; the
// output and its gradient are [B, Nq, H*D].
// ------------------------------------------------------------------------------------------

// Part `part` of [B, N, parts*H*D] as a [B, H, N, D] view (element (b, h, n, d) at
// x[b, n, (part*H + h)*D + d]).
at::Tensor head_view(const at::Tensor& x, int64_t parts, int64_t part, int64_t heads, const char* name) {
  TORCH_CHECK(x.dim() == 3 && heads > 0 && x.size(2) % (parts * heads) == 0, name, " must be [B, N, ", parts,
              "*H*D] with H=", heads, "; got ", x.sizes());
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, name, " must have a contiguous last dim; got strides ",
              x.strides());
  const int64_t d = x.size(2) / (parts * heads);
  return x.as_strided({x.size(0), heads, x.size(1), d}, {x.stride(0), d, x.stride(1), 1},
                      x.storage_offset() + part * heads * d);
}

// q, k, v views of the fused inputs (kv_src undefined: self-attention from qkv).
std::vector<at::Tensor> fused_views(const at::Tensor& q_src, const c10::optional<at::Tensor>& kv_src, int64_t heads) {
  if (kv_src.has_value() && kv_src->defined())
    return {head_view(q_src, 1, 0, heads, "q"), head_view(*kv_src, 2, 0, heads, "kv"),
            head_view(*kv_src, 2, 1, heads, "kv")};
  return {head_view(q_src, 3, 0, heads, "qkv"), head_view(q_src, 3, 1, heads, "qkv"),
          head_view(q_src, 3, 2, heads, "qkv")};
}

// -> [out [B, Nq, H*D] (q's dtype), lse [B, H, Nq] fp32]
std::vector<at::Tensor> forward_fused(const at::Tensor& q_src, const c10::optional<at::Tensor>& kv_src,
                                      const at::Tensor& seg_q, const at::Tensor& seg_k, int64_t heads,
                                      bool inclusive, double scale, int64_t stream) {
  const std::vector<at::Tensor> qkv = fused_views(q_src, kv_src, heads);
  SegAttnParams p = common_params(qkv[0], qkv[1], qkv[2], seg_q, seg_k, inclusive, scale);
  at::Tensor out = at::empty({q_src.size(0), q_src.size(1), heads * qkv[0].size(3)}, q_src.options());
  at::Tensor lse = run_forward(p, qkv[0], head_view(out, 1, 0, heads, "out"), stream);
  return {out, lse};
}

// -> [d q_src (like q_src, contiguous), d kv_src (like kv_src; empty for self-attention)]
std::vector<at::Tensor> backward_fused(const at::Tensor& dout_in, const at::Tensor& q_src,
                                       const c10::optional<at::Tensor>& kv_src, const at::Tensor& out,
                                       const at::Tensor& lse, const at::Tensor& seg_q, const at::Tensor& seg_k,
                                       int64_t heads, bool inclusive, double scale, int64_t stream) {
  const std::vector<at::Tensor> qkv = fused_views(q_src, kv_src, heads);
  SegAttnParams p = common_params(qkv[0], qkv[1], qkv[2], seg_q, seg_k, inclusive, scale);
  const bool cross = kv_src.has_value() && kv_src->defined();
  at::Tensor dq_src = at::empty(q_src.sizes(), q_src.options());
  at::Tensor dkv_src = cross ? at::empty(kv_src->sizes(), kv_src->options()) : at::empty({0}, q_src.options());
  const std::vector<at::Tensor> grads = fused_views(dq_src, cross ? c10::optional<at::Tensor>(dkv_src)
                                                                  : c10::optional<at::Tensor>(), heads);
  const at::Tensor dout = dout_in.dim() == 3 && dout_in.stride(-1) == 1 ? dout_in : dout_in.contiguous();
  TORCH_CHECK(dout.sizes() == out.sizes(), "dout must be like out: ", out.sizes(), "; got ", dout.sizes());
  run_backward(p, qkv[0], head_view(dout, 1, 0, heads, "dout"), head_view(out, 1, 0, heads, "out"), lse,
               grads[0], grads[1], grads[2], stream);
  return {dq_src, dkv_src};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Segment-causal attention kernels (fp16/bf16, head dims 32/64/128)";
#ifdef SEGATTN_EMU
  m.attr("EMULATED") = true;  // kernels run on the CPU emulation (csrc/emu/)
#else
  m.attr("EMULATED") = false;
#endif
  m.def("forward", &forward, "segment attention forward -> [out, lse]", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("seg_q"), py::arg("seg_k"), py::arg("inclusive"), py::arg("scale"), py::arg("stream"));
  m.def("backward", &backward, "segment attention backward -> [dq, dk, dv]", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("seg_q"), py::arg("seg_k"),
        py::arg("inclusive"), py::arg("scale"), py::arg("stream"));
  m.def("forward_fused", &forward_fused,
        "segment attention forward from qkv [B, N, 3*H*D] (kv None) or q [B, Nq, H*D] + kv [B, Nk, 2*H*D] "
        "-> [out [B, Nq, H*D], lse [B, H, Nq]]",
        py::arg("q_src"), py::arg("kv_src"), py::arg("seg_q"), py::arg("seg_k"), py::arg("heads"),
        py::arg("inclusive"), py::arg("scale"), py::arg("stream"));
  m.def("backward_fused", &backward_fused,
        "segment attention backward in the fused layouts -> [d q_src, d kv_src (empty for qkv)]", py::arg("dout"),
        py::arg("q_src"), py::arg("kv_src"), py::arg("out"), py::arg("lse"), py::arg("seg_q"), py::arg("seg_k"),
        py::arg("heads"), py::arg("inclusive"), py::arg("scale"), py::arg("stream"));
}
