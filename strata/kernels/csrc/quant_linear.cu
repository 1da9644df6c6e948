// Linear layers over block-quantized weights on the GPU (strata/kernels/quantized.py's formats, as stored):
//   int8: qs int8 [N, K], d fp16 [N, K/32]                  w = d * q
//   int4: qs uint8 [N, K/2], d, m fp16 [N, K/32]            w = d * q + m (byte j of a block: element j in the low
//                                                            nibble, element j + 16 in the high one)
// Weight-only: the activations stay in their dtype (a GPU has the compute to spare; what decode lacks is bandwidth).
//
// quant_gemv: the few rows of a decode step. One warp per output column; its lanes take the column's blocks in
// turn (consecutive lanes read consecutive blocks: coalesced), dequantize each in registers, multiply every row
// and sum across the warp. dequantize: W in the activations' dtype, for a prefill chunk's matrix product.
// The oracle is the PyTorch reference F.linear(x, weight.dequantize()) (tests/gpu/test_kernels_gpu.py).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "common.cuh"

namespace strata {
namespace {

constexpr int kBlock = 32;
constexpr int kWarps = 4;       // columns per CTA
constexpr int kMaxRows = 8;     // rows of one quant_gemv call

template <bool INT4>
__device__ __forceinline__ void block_weights(const uint8_t* qs, float scale, float offset, float* w) {
  if (INT4) {
    const uint4 raw = *reinterpret_cast<const uint4*>(qs);  // 16 bytes: 32 nibbles
    const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
    for (int j = 0; j < kBlock / 2; ++j) {
      w[j] = scale * static_cast<float>(b[j] & 0x0F) + offset;
      w[j + kBlock / 2] = scale * static_cast<float>(b[j] >> 4) + offset;
    }
  } else {
    const uint4 lo = *reinterpret_cast<const uint4*>(qs);
    const uint4 hi = *reinterpret_cast<const uint4*>(qs + 16);
    const int8_t* a = reinterpret_cast<const int8_t*>(&lo);
    const int8_t* b = reinterpret_cast<const int8_t*>(&hi);
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      w[j] = scale * static_cast<float>(a[j]);
      w[j + 16] = scale * static_cast<float>(b[j]);
    }
  }
}

template <typename T, bool INT4>
__global__ void quant_gemv_kernel(T* __restrict__ out, const T* __restrict__ x, const uint8_t* __restrict__ qs,
                                  const __half* __restrict__ d, const __half* __restrict__ m, int rows, int n_cols,
                                  int k) {
  const int lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarps + threadIdx.x / 32;
  if (n >= n_cols) return;
  const int nb = k / kBlock;
  const int64_t row_bytes = INT4 ? k / 2 : k;
  float acc[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.f;
  for (int b = lane; b < nb; b += 32) {
    float w[kBlock];
    const float scale = __half2float(d[static_cast<int64_t>(n) * nb + b]);
    const float offset = INT4 ? __half2float(m[static_cast<int64_t>(n) * nb + b]) : 0.f;
    block_weights<INT4>(qs + n * row_bytes + b * (INT4 ? kBlock / 2 : kBlock), scale, offset, w);
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < rows) {
        const T* xr = x + static_cast<int64_t>(r) * k + b * kBlock;
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < kBlock; ++j) s += w[j] * to_float(xr[j]);
        acc[r] += s;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r < rows) {
      float v = acc[r];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
      if (lane == 0) out[static_cast<int64_t>(r) * n_cols + n] = from_float<T>(v);
    }
  }
}

template <typename T, bool INT4>
__global__ void dequantize_kernel(T* __restrict__ out, const uint8_t* __restrict__ qs, const __half* __restrict__ d,
                                  const __half* __restrict__ m, int64_t blocks) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // one block of 32 values
  if (i >= blocks) return;
  float w[kBlock];
  block_weights<INT4>(qs + i * (INT4 ? kBlock / 2 : kBlock), __half2float(d[i]), INT4 ? __half2float(m[i]) : 0.f,
                      w);
#pragma unroll
  for (int j = 0; j < kBlock; ++j) out[i * kBlock + j] = from_float<T>(w[j]);
}

void check_weight(const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m, int64_t* n,
                  int64_t* k) {
  const bool int4 = m.has_value();
  TORCH_CHECK(qs.is_cuda() && qs.dim() == 2 && qs.is_contiguous() &&
                  qs.scalar_type() == (int4 ? at::kByte : at::kChar),
              "quantized weight: qs int8 [N, K] or uint8 [N, K/2], contiguous, on the GPU");
  *n = qs.size(0);
  *k = int4 ? qs.size(1) * 2 : qs.size(1);
  TORCH_CHECK(*k % kBlock == 0, "quantized weight: K a multiple of 32");
  for (const at::Tensor* t : {&d, int4 ? &*m : &d}) {
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kHalf && t->is_contiguous() && t->size(0) == *n &&
                    t->size(1) == *k / kBlock,
                "quantized weight: scales float16 [N, K/32] on the GPU");
  }
}

}  // namespace

void quant_gemv(at::Tensor out, at::Tensor x, at::Tensor qs, at::Tensor d, std::optional<at::Tensor> m) {
  int64_t n, k;
  check_weight(qs, d, m, &n, &k);
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.size(1) == k && x.size(0) <= kMaxRows,
              "quant_gemv: x [rows <= 8, K] contiguous on the GPU");
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.size(0) == x.size(0) && out.size(1) == n &&
                  out.scalar_type() == x.scalar_type(),
              "quant_gemv: out [rows, N] of x's dtype");
  const at::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps));
  const __half* dp = reinterpret_cast<const __half*>(d.data_ptr<at::Half>());
  const __half* mp = m.has_value() ? reinterpret_cast<const __half*>(m->data_ptr<at::Half>()) : nullptr;
  const int rows = static_cast<int>(x.size(0));
  auto launch = [&](auto* o, const auto* xp) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(xp)>>;
    if (m.has_value()) {
      quant_gemv_kernel<T, true><<<grid, kWarps * 32, 0, stream>>>(o, xp, qs.data_ptr<uint8_t>(), dp, mp, rows,
                                                                   static_cast<int>(n), static_cast<int>(k));
    } else {
      quant_gemv_kernel<T, false><<<grid, kWarps * 32, 0, stream>>>(
          o, xp, reinterpret_cast<const uint8_t*>(qs.data_ptr<int8_t>()), dp, nullptr, rows, static_cast<int>(n),
          static_cast<int>(k));
    }
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(out.data_ptr<float>(), x.data_ptr<float>()); break;
    case at::kHalf:
      launch(reinterpret_cast<__half*>(out.data_ptr<at::Half>()), reinterpret_cast<const __half*>(x.data_ptr<at::Half>()));
      break;
    case at::kBFloat16:
      launch(reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>()),
             reinterpret_cast<const __nv_bfloat16*>(x.data_ptr<at::BFloat16>()));
      break;
    default: TORCH_CHECK(false, "quant_gemv: float32, float16 or bfloat16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quant_dequantize(at::Tensor out, at::Tensor qs, at::Tensor d, std::optional<at::Tensor> m) {
  int64_t n, k;
  check_weight(qs, d, m, &n, &k);
  TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.size(0) == n && out.size(1) == k,
              "dequantize: out [N, K] contiguous on the GPU");
  const at::cuda::CUDAGuard guard(qs.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = n * (k / kBlock);
  const dim3 grid(static_cast<unsigned>((blocks + 255) / 256));
  const __half* dp = reinterpret_cast<const __half*>(d.data_ptr<at::Half>());
  const __half* mp = m.has_value() ? reinterpret_cast<const __half*>(m->data_ptr<at::Half>()) : nullptr;
  const uint8_t* q = static_cast<const uint8_t*>(qs.data_ptr());
  auto launch = [&](auto* o) {
    using T = std::remove_pointer_t<decltype(o)>;
    if (m.has_value()) dequantize_kernel<T, true><<<grid, 256, 0, stream>>>(o, q, dp, mp, blocks);
    else dequantize_kernel<T, false><<<grid, 256, 0, stream>>>(o, q, dp, nullptr, blocks);
  };
  switch (out.scalar_type()) {
    case at::kFloat: launch(out.data_ptr<float>()); break;
    case at::kHalf: launch(reinterpret_cast<__half*>(out.data_ptr<at::Half>())); break;
    case at::kBFloat16: launch(reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>())); break;
    default: TORCH_CHECK(false, "dequantize: float32, float16 or bfloat16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace strata
