// Copy one layer's K and V rows between the device pool and host buffers: dst[:, dst_slots] = src[:, src_slots].
//
// Either side may be pinned host memory: the kernel reads or writes it over PCIe directly (unified virtual
// addressing), so a scattered load into pool slots is one launch per layer with no staging copy on the device.
// A missing index means rows 0..n-1. Tensors are [2, slots, kv_heads, head_dim] with kv_heads * head_dim
// contiguous; the first two strides are free (a chunk's layer slice [2, :count] is not contiguous).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace strata {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // chunks each thread has in flight: PCIe latency needs many outstanding reads

struct CopyParams {
  char* dst;
  const char* src;
  const int64_t* dst_slots;  // null: identity
  const int64_t* src_slots;
  int64_t dst_kv_stride, dst_slot_stride, src_kv_stride, src_slot_stride;  // bytes
  int64_t rows;  // per K or V
  int64_t chunks;  // 16-byte pieces per row
};

__global__ void __launch_bounds__(kThreads) copy_kv_slots_kernel(const CopyParams p) {
  const int64_t per_half = p.rows * p.chunks;
  const int64_t total = 2 * per_half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; base < total;
       base += kUnroll * stride) {
    uint4 data[kUnroll];
    int64_t dst_at[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = base + u * stride;
      if (idx >= total) break;
      const int64_t kv = idx / per_half, rest = idx % per_half;
      const int64_t row = rest / p.chunks, chunk = rest % p.chunks;
      const int64_t s = p.src_slots != nullptr ? p.src_slots[row] : row;
      const int64_t d = p.dst_slots != nullptr ? p.dst_slots[row] : row;
      data[u] = *reinterpret_cast<const uint4*>(p.src + kv * p.src_kv_stride + s * p.src_slot_stride + chunk * 16);
      dst_at[u] = kv * p.dst_kv_stride + d * p.dst_slot_stride + chunk * 16;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * stride >= total) break;
      *reinterpret_cast<uint4*>(p.dst + dst_at[u]) = data[u];
    }
  }
}

// The address a kernel uses for t: its own on the GPU; for pinned host memory the mapped device address.
char* device_address(const at::Tensor& t) {
  if (t.is_cuda()) return static_cast<char*>(t.data_ptr());
  TORCH_CHECK(t.is_cpu() && t.is_pinned(), "copy_kv_slots: a host tensor must be in pinned memory");
  cudaPointerAttributes attr{};
  C10_CUDA_CHECK(cudaPointerGetAttributes(&attr, t.data_ptr()));
  TORCH_CHECK(attr.devicePointer != nullptr, "copy_kv_slots: pinned memory is not mapped into the GPU");
  return static_cast<char*>(attr.devicePointer);
}

void check_side(const at::Tensor& t, const std::optional<at::Tensor>& slots, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == 2, "copy_kv_slots: ", name, " must be [2, slots, kv_heads, head_dim]");
  TORCH_CHECK(t.stride(3) == 1 && t.stride(2) == t.size(3), "copy_kv_slots: ", name, " rows must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.stride(0) * t.element_size()) % 16 == 0 &&
                  (t.stride(1) * t.element_size()) % 16 == 0,
              "copy_kv_slots: ", name, " must be 16-byte aligned");
  if (slots) {
    TORCH_CHECK(slots->is_cuda() && slots->scalar_type() == at::kLong && slots->dim() == 1 &&
                    slots->is_contiguous(),
                "copy_kv_slots: ", name, " slots must be a contiguous int64 GPU tensor");
  }
}

}  // namespace

void copy_kv_slots(at::Tensor dst, std::optional<at::Tensor> dst_slots, at::Tensor src,
                   std::optional<at::Tensor> src_slots) {
  TORCH_CHECK(dst.is_cuda() || src.is_cuda(), "copy_kv_slots: one side must be on the GPU");
  TORCH_CHECK(dst.scalar_type() == src.scalar_type() && dst.size(2) == src.size(2) && dst.size(3) == src.size(3),
              "copy_kv_slots: dtype or row shape differ");
  check_side(dst, dst_slots, "dst");
  check_side(src, src_slots, "src");
  const int64_t rows = dst_slots ? dst_slots->size(0) : src_slots ? src_slots->size(0) : src.size(1);
  TORCH_CHECK(!dst_slots || !src_slots || dst_slots->size(0) == src_slots->size(0), "copy_kv_slots: slot counts");
  TORCH_CHECK(dst_slots || rows <= dst.size(1), "copy_kv_slots: dst has too few rows");
  TORCH_CHECK(src_slots || rows <= src.size(1), "copy_kv_slots: src has too few rows");
  const int64_t row_bytes = dst.size(2) * dst.size(3) * dst.element_size();
  TORCH_CHECK(row_bytes % 16 == 0, "copy_kv_slots: a row must be a multiple of 16 bytes");
  if (rows == 0) return;

  const c10::Device device = dst.is_cuda() ? dst.device() : src.device();
  const c10::cuda::CUDAGuard guard(device);
  const int64_t elem = dst.element_size();
  CopyParams p{};
  p.dst = device_address(dst);
  p.src = device_address(src);
  p.dst_slots = dst_slots ? dst_slots->data_ptr<int64_t>() : nullptr;
  p.src_slots = src_slots ? src_slots->data_ptr<int64_t>() : nullptr;
  p.dst_kv_stride = dst.stride(0) * elem;
  p.dst_slot_stride = dst.stride(1) * elem;
  p.src_kv_stride = src.stride(0) * elem;
  p.src_slot_stride = src.stride(1) * elem;
  p.rows = rows;
  p.chunks = row_bytes / 16;
  const int64_t total = 2 * rows * p.chunks;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  const int64_t blocks = std::min<int64_t>((total + kThreads * kUnroll - 1) / (kThreads * kUnroll), 8LL * sms);
  copy_kv_slots_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace strata
