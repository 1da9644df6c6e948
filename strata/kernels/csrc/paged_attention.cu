// Decode attention over the paged KV cache: one query token per sequence, grouped-query attention.
//
// Split-K ("flash decoding"): each CTA handles one (sequence, KV head, tile of query heads, partition of
// kPartition tokens). The query heads sharing a KV head are processed together, so every K/V row is read
// from device memory once. A second kernel merges the partitions with their softmax max and sum. When every
// context fits one partition, the first kernel writes the normalized output directly.
//
// Cache layout per layer: [num_blocks, block_size, kv_heads, head_dim]; only head_dim must be contiguous.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.cuh"

namespace strata {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kPartition = 256;  // tokens per CTA: enough CTAs for one long sequence, scores fit in smem

struct DecodeParams {
  void* out;  // [B, H, D]; null when partitions are merged by the second kernel
  float* part_acc;  // [B, H, P, D] unnormalized sum of p * v per partition
  float* part_max;  // [B, H, P]
  float* part_sum;  // [B, H, P]
  const void* q;  // [B, H, D] contiguous
  const void* k_cache;
  const void* v_cache;
  int64_t block_stride, token_stride, head_stride;  // elements, the same for K and V
  const int64_t* block_tables;  // [B, max_blocks]
  int64_t table_stride;
  const int64_t* context_lens;  // [B]
  int num_heads, num_kv_heads, block_size, num_partitions;
  float scale;
};

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads) decode_partition_kernel(const DecodeParams p) {
  constexpr int kVec = Vec<T>::kElems;
  constexpr int kChunks = D / kVec;  // 16-byte chunks per K/V row
  // Scores: few lanes per key row keep the dot-product reduction short (log2 lanes shuffles).
  constexpr int kLanesK = kChunks < 8 ? kChunks : 8;
  constexpr int kChunksK = kChunks / kLanesK;
  constexpr int kTokensK = 32 / kLanesK;
  constexpr int kUnrollK = kChunksK >= 4 ? 1 : 4 / kChunksK;  // 64 bytes of K in flight per lane
  // Values: each lane owns a fixed slice of the head dim, so it needs few accumulators.
  constexpr int kLanesV = kChunks < 32 ? kChunks : 32;
  constexpr int kChunksV = kChunks / kLanesV;
  constexpr int kTokensV = 32 / kLanesV;
  constexpr int kUnrollV = kChunksV >= 4 ? 1 : 4 / kChunksV;

  __shared__ float q_s[G][D];
  __shared__ float p_s[G][kPartition];  // scores, then exp(score - max)
  __shared__ float red_s[G][D];
  __shared__ float max_s[G];
  __shared__ float sum_s[G];

  const T* q = static_cast<const T*>(p.q);
  const int part = blockIdx.x;
  const int group = p.num_heads / p.num_kv_heads;
  const int tiles = (group + G - 1) / G;
  const int kv_head = blockIdx.y / tiles;
  const int head0 = kv_head * group + (blockIdx.y % tiles) * G;
  const int heads = min(G, kv_head * group + group - head0);
  const int b = blockIdx.z;
  const int len = static_cast<int>(p.context_lens[b]);
  const int start = part * kPartition;
  if (start >= len) return;  // the whole CTA leaves: the merge reads only partitions below len
  const int n = min(kPartition, len - start);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t* table = p.block_tables + b * p.table_stride;
  const int64_t row0 = static_cast<int64_t>(b) * p.num_heads + head0;

  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    q_s[g][d] = g < heads ? to_float(q[(row0 + g) * D + d]) * p.scale : 0.f;
    red_s[g][d] = 0.f;
  }
  __syncthreads();

  {  // 1. scores
    const int sub = lane / kLanesK, sl = lane % kLanesK;
    const T* k_base = static_cast<const T*>(p.k_cache) + kv_head * p.head_stride;
    for (int t0 = warp * kTokensK; t0 < n; t0 += kWarps * kTokensK * kUnrollK) {  // warp-uniform bound
      float kf[kUnrollK][kChunksK * kVec];
#pragma unroll
      for (int u = 0; u < kUnrollK; ++u) {
        const int t = t0 + sub + u * kWarps * kTokensK;
        if (t < n) {
          const int pos = start + t;
          const T* row = k_base + table[pos / p.block_size] * p.block_stride + (pos % p.block_size) * p.token_stride;
#pragma unroll
          for (int c = 0; c < kChunksK; ++c) load_vec<T>(row + (c * kLanesK + sl) * kVec, &kf[u][c * kVec]);
        } else {
#pragma unroll
          for (int i = 0; i < kChunksK * kVec; ++i) kf[u][i] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kUnrollK; ++u) {
        const int t = t0 + sub + u * kWarps * kTokensK;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float dot = 0.f;
#pragma unroll
          for (int c = 0; c < kChunksK; ++c) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) dot += q_s[g][(c * kLanesK + sl) * kVec + i] * kf[u][c * kVec + i];
          }
#pragma unroll
          for (int off = kLanesK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          if (sl == 0 && t < n) p_s[g][t] = dot;
        }
      }
    }
  }
  __syncthreads();

  // 2. softmax over the partition: one warp per query head
  for (int g = warp; g < G; g += kWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, p_s[g][t]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.f;
    for (int t = lane; t < n; t += 32) {
      const float e = expf(p_s[g][t] - m);
      p_s[g][t] = e;
      l += e;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) {
      max_s[g] = m;
      sum_s[g] = l;
    }
  }
  __syncthreads();

  {  // 3. sum of p * v
    const int sub = lane / kLanesV, sl = lane % kLanesV;
    const T* v_base = static_cast<const T*>(p.v_cache) + kv_head * p.head_stride;
    float acc[G][kChunksV * kVec];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < kChunksV * kVec; ++i) acc[g][i] = 0.f;
    }
    for (int t0 = warp * kTokensV; t0 < n; t0 += kWarps * kTokensV * kUnrollV) {
      float vf[kUnrollV][kChunksV * kVec];
#pragma unroll
      for (int u = 0; u < kUnrollV; ++u) {
        const int t = t0 + sub + u * kWarps * kTokensV;
        if (t < n) {
          const int pos = start + t;
          const T* row = v_base + table[pos / p.block_size] * p.block_stride + (pos % p.block_size) * p.token_stride;
#pragma unroll
          for (int c = 0; c < kChunksV; ++c) load_vec<T>(row + (c * kLanesV + sl) * kVec, &vf[u][c * kVec]);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnrollV; ++u) {
        const int t = t0 + sub + u * kWarps * kTokensV;
        if (t < n) {  // p_s past n is stale: never read it
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float w = p_s[g][t];
#pragma unroll
            for (int i = 0; i < kChunksV * kVec; ++i) acc[g][i] += w * vf[u][i];
          }
        }
      }
    }
    // Lanes holding the same slice: first within the warp, then the warps one after another (deterministic).
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int i = 0; i < kChunksV * kVec; ++i) {
#pragma unroll
        for (int off = kLanesV; off < 32; off *= 2) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], off);
      }
    }
    for (int w = 0; w < kWarps; ++w) {
      if (warp == w && sub == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
#pragma unroll
          for (int c = 0; c < kChunksV; ++c) {
#pragma unroll
            for (int i = 0; i < kVec; ++i) red_s[g][(c * kLanesV + sl) * kVec + i] += acc[g][c * kVec + i];
          }
        }
      }
      __syncthreads();
    }
  }

  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    if (g >= heads) continue;
    if (p.out != nullptr) {
      static_cast<T*>(p.out)[(row0 + g) * D + d] = from_float<T>(red_s[g][d] / sum_s[g]);
    } else {
      p.part_acc[((row0 + g) * p.num_partitions + part) * D + d] = red_s[g][d];
    }
  }
  if (p.out == nullptr && threadIdx.x < heads) {
    p.part_max[(row0 + threadIdx.x) * p.num_partitions + part] = max_s[threadIdx.x];
    p.part_sum[(row0 + threadIdx.x) * p.num_partitions + part] = sum_s[threadIdx.x];
  }
}

__device__ __forceinline__ float block_reduce(float x, bool is_max, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, off);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < kWarps; ++w) x = is_max ? fmaxf(x, scratch[w]) : x + scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return x;
}

// Merge the partitions of one (sequence, head): out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeParams p, const int head_dim) {
  extern __shared__ float weight_s[];  // [num_partitions]
  __shared__ float scratch[kWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.y) * p.num_heads + blockIdx.x;
  const int len = static_cast<int>(p.context_lens[blockIdx.y]);
  const int parts = (len + kPartition - 1) / kPartition;
  const float* maxes = p.part_max + row * p.num_partitions;
  const float* sums = p.part_sum + row * p.num_partitions;

  float m = -INFINITY;
  for (int i = threadIdx.x; i < parts; i += kThreads) m = fmaxf(m, maxes[i]);
  m = block_reduce(m, true, scratch);
  float l = 0.f;
  for (int i = threadIdx.x; i < parts; i += kThreads) {
    const float w = expf(maxes[i] - m);
    weight_s[i] = w;
    l += w * sums[i];
  }
  l = block_reduce(l, false, scratch);  // its barrier also publishes weight_s
  const float* acc = p.part_acc + row * p.num_partitions * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kThreads) {
    float a = 0.f;
    for (int i = 0; i < parts; ++i) a += weight_s[i] * acc[i * head_dim + d];
    static_cast<T*>(p.out)[row * head_dim + d] = from_float<T>(a / l);
  }
}

template <typename T, int D, int G>
void launch(DecodeParams p, int batch, int tiles, int head_dim, cudaStream_t stream) {
  const dim3 grid(p.num_partitions, p.num_kv_heads * tiles, batch);
  if (p.num_partitions == 1) {
    decode_partition_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  DecodeParams partial = p;
  partial.out = nullptr;
  decode_partition_kernel<T, D, G><<<grid, kThreads, 0, stream>>>(partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 merge_grid(p.num_heads, batch);
  decode_merge_kernel<T><<<merge_grid, kThreads, p.num_partitions * sizeof(float), stream>>>(p, head_dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_group(DecodeParams p, int batch, int tile, int tiles, cudaStream_t stream) {
  switch (tile) {
    case 1: return launch<T, D, 1>(p, batch, tiles, D, stream);
    case 2: return launch<T, D, 2>(p, batch, tiles, D, stream);
    case 4: return launch<T, D, 4>(p, batch, tiles, D, stream);
    default: return launch<T, D, 8>(p, batch, tiles, D, stream);
  }
}

template <typename T>
void launch_dim(DecodeParams p, int batch, int head_dim, int tile, int tiles, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_group<T, 64>(p, batch, tile, tiles, stream);
    case 128: return launch_group<T, 128>(p, batch, tile, tiles, stream);
    case 256: return launch_group<T, 256>(p, batch, tile, tiles, stream);
    default: TORCH_CHECK(false, "paged decode attention: unsupported head_dim ", head_dim);
  }
}

}  // namespace

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                            at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.is_cuda() && out.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && block_tables.is_cuda() &&
                  context_lens.is_cuda(),
              "paged decode attention: every tensor must be on the GPU");
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes(),
              "q and out: contiguous [batch, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.stride(3) == 1,
              "k_cache, v_cache: [blocks, block_size, kv_heads, head_dim] with equal strides, head_dim contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "q, caches and out must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables: int64 [batch, max_blocks], rows contiguous");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.dim() == 1 && context_lens.is_contiguous(),
              "context_lens: contiguous int64 [batch]");
  const int batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int kv_heads = k_cache.size(2), block_size = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == head_dim && heads % kv_heads == 0, "head counts or head_dim do not match");
  TORCH_CHECK(block_tables.size(0) == batch && context_lens.size(0) == batch, "batch sizes do not match");
  if (batch == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int group = heads / kv_heads;
  const int tile = group > 4 ? 8 : group > 2 ? 4 : group;  // query heads per CTA, a power of 2; more: several tiles
  const int tiles = (group + tile - 1) / tile;
  // Sized from the block table, not from context_lens: no device-to-host read.
  const int64_t max_len = block_tables.size(1) * static_cast<int64_t>(block_size);
  const int partitions = static_cast<int>(std::max<int64_t>(1, (max_len + kPartition - 1) / kPartition));

  DecodeParams p{};
  p.out = out.data_ptr();
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_stride = k_cache.stride(0);
  p.token_stride = k_cache.stride(1);
  p.head_stride = k_cache.stride(2);
  p.block_tables = block_tables.data_ptr<int64_t>();
  p.table_stride = block_tables.stride(0);
  p.context_lens = context_lens.data_ptr<int64_t>();
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.block_size = block_size;
  p.num_partitions = partitions;
  p.scale = static_cast<float>(scale);
  at::Tensor part_acc, part_max, part_sum;
  if (partitions > 1) {
    const auto opts = q.options().dtype(at::kFloat);
    part_acc = at::empty({batch, heads, partitions, head_dim}, opts);
    part_max = at::empty({batch, heads, partitions}, opts);
    part_sum = at::empty({batch, heads, partitions}, opts);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_max = part_max.data_ptr<float>();
    p.part_sum = part_sum.data_ptr<float>();
  }
  switch (q.scalar_type()) {
    case at::kFloat: return launch_dim<float>(p, batch, head_dim, tile, tiles, stream);
    case at::kHalf: return launch_dim<__half>(p, batch, head_dim, tile, tiles, stream);
    case at::kBFloat16: return launch_dim<__nv_bfloat16>(p, batch, head_dim, tile, tiles, stream);
    default: TORCH_CHECK(false, "paged decode attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace strata
