// Write the K/V of new tokens into their cache slots (slot = block * block_size + offset).
//
// Byte copies of 16-byte chunks, so one kernel serves every dtype; inputs may be strided views (v is a
// slice of the fused qkv projection), only head_dim must be contiguous.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace strata {
namespace {

struct WriteParams {
  char* k_cache;
  char* v_cache;
  const char* k;
  const char* v;
  const int64_t* slots;
  int64_t k_token_stride, k_head_stride, v_token_stride, v_head_stride;  // bytes
  int64_t block_stride, token_stride, head_stride;  // bytes, the same for both caches
  int block_size, kv_heads, chunks;  // chunks: 16-byte pieces of one head
};

__global__ void write_kv_kernel(const WriteParams p) {
  const int t = blockIdx.x;
  const int64_t slot = p.slots[t];
  if (slot < 0) return;  // a padding row writes nothing
  const int64_t base = (slot / p.block_size) * p.block_stride + (slot % p.block_size) * p.token_stride;
  for (int i = threadIdx.x; i < p.kv_heads * p.chunks; i += blockDim.x) {
    const int h = i / p.chunks, c = i % p.chunks;
    const int64_t dst = base + h * p.head_stride + c * 16;
    *reinterpret_cast<uint4*>(p.k_cache + dst) =
        *reinterpret_cast<const uint4*>(p.k + t * p.k_token_stride + h * p.k_head_stride + c * 16);
    *reinterpret_cast<uint4*>(p.v_cache + dst) =
        *reinterpret_cast<const uint4*>(p.v + t * p.v_token_stride + h * p.v_head_stride + c * 16);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

void write_kv(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v, at::Tensor slots) {
  TORCH_CHECK(k_cache.is_cuda() && v_cache.is_cuda() && k.is_cuda() && v.is_cuda() && slots.is_cuda(),
              "write_kv: every tensor must be on the GPU");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes(),
              "write_kv: k_cache and v_cache must have one shape and one layout");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3),
              "write_kv: k, v must be [tokens, kv_heads, head_dim] matching the cache");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "write_kv: one dtype for all tensors");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() &&
                  slots.size(0) == k.size(0),
              "write_kv: slots must be contiguous int64 [tokens]");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k_cache.stride(3) == 1, "write_kv: head_dim must be contiguous");
  const int64_t elem = k.element_size();
  const int64_t head_bytes = k.size(2) * elem;
  TORCH_CHECK(head_bytes % 16 == 0 && aligned16(k) && aligned16(v) && aligned16(k_cache) && aligned16(v_cache),
              "write_kv: rows must be 16-byte aligned");
  for (const auto& t : {k, v, k_cache}) {
    for (int d = 0; d + 1 < t.dim(); ++d) TORCH_CHECK((t.stride(d) * elem) % 16 == 0, "write_kv: unaligned stride");
  }
  const int tokens = k.size(0);
  if (tokens == 0) return;

  const c10::cuda::CUDAGuard guard(k.device());
  WriteParams p{};
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = static_cast<char*>(v_cache.data_ptr());
  p.k = static_cast<const char*>(k.data_ptr());
  p.v = static_cast<const char*>(v.data_ptr());
  p.slots = slots.data_ptr<int64_t>();
  p.k_token_stride = k.stride(0) * elem;
  p.k_head_stride = k.stride(1) * elem;
  p.v_token_stride = v.stride(0) * elem;
  p.v_head_stride = v.stride(1) * elem;
  p.block_stride = k_cache.stride(0) * elem;
  p.token_stride = k_cache.stride(1) * elem;
  p.head_stride = k_cache.stride(2) * elem;
  p.block_size = k_cache.size(1);
  p.kv_heads = k.size(1);
  p.chunks = head_bytes / 16;
  const int work = p.kv_heads * p.chunks;
  const int threads = std::min(256, (work + 31) / 32 * 32);
  write_kv_kernel<<<tokens, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace strata
