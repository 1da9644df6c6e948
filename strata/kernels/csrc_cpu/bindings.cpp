// Python bindings of the CPU kernels (strata.kernels.ops dispatches to them for CPU tensors). A plain
// Python module rather than torch.ops: a decode step calls a few hundred of them, and each torch.ops call
// costs several microseconds more than a direct one.

#include <torch/extension.h>

#include <optional>

namespace strata_cpu {
void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& row_seq, const at::Tensor& row_len,
                     double scale);
at::Tensor pack_int8(const at::Tensor& qs, const at::Tensor& d);
at::Tensor pack_int4(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m);
at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n, bool int4,
                         const std::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor rotary_store_kv(const at::Tensor& qkv, const at::Tensor& cos_sin, const at::Tensor& positions,
                           const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, int64_t heads);
}  // namespace strata_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace strata_cpu;
  m.def("paged_attention", &paged_attention, "out = attention of each query row over its paged K/V",
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("row_seq"), py::arg("row_len"), py::arg("scale"));
  m.def("pack_int8", &pack_int8, "an int8 block-quantized W in the kernel's layout", py::arg("qs"), py::arg("d"));
  m.def("pack_int4", &pack_int4, "an int4 block-quantized W in the kernel's layout", py::arg("qs"), py::arg("d"),
        py::arg("m"));
  m.def("linear_packed", &linear_packed, "x W^T (+ b) for a packed quantized W [N, K]", py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("int4"), py::arg("bias"));
  m.def("rms_norm", &rms_norm, "RMSNorm of each row", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "x += delta in place, then RMSNorm of each row", py::arg("x"),
        py::arg("delta"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up] rows", py::arg("gate_up"));
  m.def("rotary_store_kv", &rotary_store_kv, "rotate q and k, store k and v at their slots, return q",
        py::arg("qkv"), py::arg("cos_sin"), py::arg("positions"), py::arg("slots"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("heads"));
}
