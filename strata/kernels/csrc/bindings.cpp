// Python bindings of the CUDA kernels (strata.kernels.ops dispatches to them for GPU tensors).

#include <torch/extension.h>

#include <optional>

namespace strata {
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, double scale);
void write_kv(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v, at::Tensor slots);
void copy_kv_slots(at::Tensor dst, std::optional<at::Tensor> dst_slots, at::Tensor src,
                   std::optional<at::Tensor> src_slots);
void quant_gemv(at::Tensor out, at::Tensor x, at::Tensor qs, at::Tensor d, std::optional<at::Tensor> m);
void quant_dequantize(at::Tensor out, at::Tensor qs, at::Tensor d, std::optional<at::Tensor> m);
}  // namespace strata

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &strata::paged_decode_attention,
        "out = attention of one query per sequence over its paged K/V", py::arg("out"), py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"));
  m.def("write_kv", &strata::write_kv, "store new tokens' K/V at their slots", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("k"), py::arg("v"), py::arg("slots"));
  m.def("copy_kv_slots", &strata::copy_kv_slots, "dst[:, dst_slots] = src[:, src_slots] (pinned host or GPU)",
        py::arg("dst"), py::arg("dst_slots"), py::arg("src"), py::arg("src_slots"));
  m.def("quant_gemv", &strata::quant_gemv, "out = x W^T for a block-quantized W and at most 8 rows of x",
        py::arg("out"), py::arg("x"), py::arg("qs"), py::arg("d"), py::arg("m"));
  m.def("quant_dequantize", &strata::quant_dequantize, "out = a block-quantized W in out's dtype", py::arg("out"),
        py::arg("qs"), py::arg("d"), py::arg("m"));
}
