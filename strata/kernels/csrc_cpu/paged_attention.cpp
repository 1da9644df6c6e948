// Attention over the paged KV cache on CPU: every query row reads its sequence's K/V blocks where they
// lie, instead of gathering the whole context into a padded copy per layer (the PyTorch reference,
// strata/kernels/paged_attention.py, is this kernel's test oracle).
//
// A work item is a query row (with all its heads, or one KV head's group of query heads when rows are
// few): its heads are scored against each cached token in one pass over K, softmaxed in float32, then
// one pass over V accumulates them.
// Rows are independent, so a decode batch is one row per sequence and a prefill chunk over history is
// one row per new token, each with its own context length (causal).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace strata_cpu {

namespace {

// A row of K or V in float32. Written as plain loops over raw bits so that the compiler vectorizes them.
inline void load_row(const float* src, float* dst, int64_t d) {
  std::memcpy(dst, src, d * sizeof(float));
}

inline void load_row(const c10::BFloat16* src, float* dst, int64_t d) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    dst[i] = __builtin_bit_cast(float, bits);
  }
}

inline void load_row(const c10::Half* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// exp(x) for the softmax (x <= 0 there): 2^k * 2^f, k an integer, |f| <= 1/2, 2^f by Cephes' exp2f
// polynomial (relative error ~1e-7). Plain arithmetic on floats and bits, so that loops over it vectorize.
inline float softmax_exp(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;  // log2(e)
  const float k = std::floor(t + 0.5f);
  const float f = t - k;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// A K or V row as float32: the cache itself when it is float32, else converted into `buf`.
template <typename T>
inline const float* row_f32(const T* src, float* buf, int64_t d) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    load_row(src, buf, d);
    return buf;
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// Eight vectors -> the vector of their eight horizontal sums.
inline __m256 sums8(const __m256* v) {
  const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// One query row's heads of KV heads kh0 .. kh0 + span - 1 (scaled, float32, [span * group, D]) against its
// context: pass 1 scores the keys eight tokens at a time (one dot product per lane), every head of a token
// while its K record is in cache; softmax; pass 2 adds up V block by block, each head's output row in registers
// over the block. out: [span * group, D] float32.
template <typename T, int64_t D>
void attend_item_avx2(const float* qf, int64_t span, int64_t group, const T* k_cache, const T* v_cache,
                      const int64_t* table, int64_t len, int64_t block_size, int64_t token_stride, int64_t kh0,
                      float* scores, float* out) {
  static_assert(D % 8 == 0, "head size a multiple of 8");
  constexpr int64_t V = D / 8;
  const int64_t nq = span * group;
  auto token = [&](const T* cache, int64_t t) {
    return cache + (table[t / block_size] * block_size + t % block_size) * token_stride + kh0 * D;
  };
  auto dot8 = [&](const float* q, const T* k) {  // 8 lanes of partial sums of q . k
    __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), load8(k)), b = _mm256_setzero_ps();
    for (int64_t i = 1; i < V; ++i) {
      if (i % 2) b = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * 8), load8(k + i * 8), b);
      else a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i * 8), load8(k + i * 8), a);
    }
    return _mm256_add_ps(a, b);
  };
  int64_t t0 = 0;
  for (; t0 + 8 <= len; t0 += 8) {
    const T* keys[8];
    for (int64_t j = 0; j < 8; ++j) keys[j] = token(k_cache, t0 + j);
    for (int64_t kh = 0; kh < span; ++kh) {
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kh * group + g;
        __m256 part[8];
        for (int64_t j = 0; j < 8; ++j) part[j] = dot8(qf + h * D, keys[j] + kh * D);
        _mm256_storeu_ps(scores + h * len + t0, sums8(part));
      }
    }
  }
  for (; t0 < len; ++t0) {
    const T* k = token(k_cache, t0);
    for (int64_t h = 0; h < nq; ++h) {
      __m256 part[8];
      part[0] = dot8(qf + h * D, k + (h / group) * D);
      for (int64_t j = 1; j < 8; ++j) part[j] = _mm256_setzero_ps();
      scores[h * len + t0] = _mm256_cvtss_f32(sums8(part));
    }
  }
  for (int64_t h = 0; h < nq; ++h) {
    float* s = scores + h * len;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      s[t] = softmax_exp(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  std::fill(out, out + nq * D, 0.f);
  for (int64_t b0 = 0; b0 < len; b0 += block_size) {
    const T* base = token(v_cache, b0);  // the block's tokens are consecutive
    const int64_t n = std::min(block_size, len - b0);
    for (int64_t h = 0; h < nq; ++h) {
      const T* v = base + (h / group) * D;
      const float* p = scores + h * len + b0;
      __m256 acc[V];
      for (int64_t i = 0; i < V; ++i) acc[i] = _mm256_loadu_ps(out + h * D + i * 8);
      for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        for (int64_t i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(pt, load8(v + t * token_stride + i * 8), acc[i]);
      }
      for (int64_t i = 0; i < V; ++i) _mm256_storeu_ps(out + h * D + i * 8, acc[i]);
    }
  }
}
#endif

template <typename T, int64_t D>
void attend_rows(T* out, const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                 int64_t table_stride, const int64_t* row_seq, const int64_t* row_len, int64_t rows,
                 int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size, float scale) {
  const int64_t d = D > 0 ? D : head_dim;  // D: the head size known at compile time (0: any)
  const int64_t group = heads / kv_heads;
  const int64_t token_stride = kv_heads * d;  // elements between consecutive tokens of one block
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (D > 0 && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)) {
    // A work item is a row with all its KV heads (each K record is read once), or one KV head of it when
    // there are too few rows to keep every thread busy.
    const int64_t span = rows >= 2 * at::get_num_threads() ? kv_heads : 1;
    const int64_t splits = kv_heads / span;
    at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> qf, acc, scores;
      qf.resize(span * group * D);
      acc.resize(span * group * D);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / splits, kh0 = item % splits * span, len = row_len[r];
        const int64_t* table = tables + (row_seq != nullptr ? row_seq[r] : r) * table_stride;
        const T* qr = q + (r * heads + kh0 * group) * D;
        for (int64_t i = 0; i < span * group * D; ++i) qf[i] = static_cast<float>(qr[i]) * scale;
        scores.resize(span * group * len);
        attend_item_avx2<T, D>(qf.data(), span, group, k_cache, v_cache, table, len, block_size, token_stride, kh0,
                               scores.data(), acc.data());
        T* o = out + (r * heads + kh0 * group) * D;
        for (int64_t i = 0; i < span * group * D; ++i) o[i] = static_cast<T>(acc[i]);
      }
    });
    return;
  }
#endif
  // A work item is one row with all its KV heads (each block is then read front to back), or with one
  // KV head when there are too few rows to keep every thread busy.
  const int64_t span = rows >= 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t splits = kv_heads / span;
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> qf, row, acc, scores;  // no allocation per call
    qf.resize(span * group * d);
    row.resize(d);
    acc.resize(span * group * d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / splits, h0 = item % splits * span;  // KV heads h0 .. h0 + span - 1
      const int64_t len = row_len[r];
      const int64_t* table = tables + (row_seq != nullptr ? row_seq[r] : r) * table_stride;
      const int64_t nq = span * group;  // query heads of this item, from query head h0 * group on
      for (int64_t h = 0; h < nq; ++h) {
        load_row(q + (r * heads + h0 * group + h) * d, qf.data() + h * d, d);
        for (int64_t i = 0; i < d; ++i) qf[h * d + i] *= scale;
      }
      scores.resize(nq * len);
      // Pass 1: scores of every cached token, block by block.
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const T* base = k_cache + table[t0 / block_size] * block_size * token_stride + h0 * d;
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t kh = 0; kh < span; ++kh) {
            const float* k = row_f32(base + j * token_stride + kh * d, row.data(), d);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = kh * group + g;
              scores[h * len + t0 + j] = dot(qf.data() + h * d, k, d);
            }
          }
        }
      }
      // Softmax per head, in float32.
      for (int64_t h = 0; h < nq; ++h) {
        float* s = scores.data() + h * len;
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) {
          s[t] = softmax_exp(s[t] - m);
          sum += s[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      // Pass 2: the weighted sum of V.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const T* base = v_cache + table[t0 / block_size] * block_size * token_stride + h0 * d;
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t kh = 0; kh < span; ++kh) {
            const float* v = row_f32(base + j * token_stride + kh * d, row.data(), d);
            for (int64_t g = 0; g < group; ++g) {
              const int64_t h = kh * group + g;
              const float p = scores[h * len + t0 + j];
              float* a = acc.data() + h * d;
#pragma omp simd
              for (int64_t i = 0; i < d; ++i) a[i] += p * v[i];
            }
          }
        }
      }
      for (int64_t h = 0; h < nq; ++h) {
        T* o = out + (r * heads + h0 * group + h) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(acc[h * d + i]);
      }
    }
  });
}

template <int64_t D>
void dispatch(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
              const int64_t* tables, int64_t table_stride, const int64_t* seq, const int64_t* len, float s) {
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  switch (q.scalar_type()) {
    case at::kFloat:
      return attend_rows<float, D>(out.data_ptr<float>(), q.data_ptr<float>(), k_cache.data_ptr<float>(),
                         v_cache.data_ptr<float>(), tables, table_stride, seq, len, rows, heads, kv_heads, d,
                         block_size, s);
    case at::kBFloat16:
      return attend_rows<c10::BFloat16, D>(out.data_ptr<c10::BFloat16>(), q.data_ptr<c10::BFloat16>(),
                         k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), tables, table_stride,
                         seq, len, rows, heads, kv_heads, d, block_size, s);
    case at::kHalf:
      return attend_rows<c10::Half, D>(out.data_ptr<c10::Half>(), q.data_ptr<c10::Half>(), k_cache.data_ptr<c10::Half>(),
                         v_cache.data_ptr<c10::Half>(), tables, table_stride, seq, len, rows, heads, kv_heads, d,
                         block_size, s);
    default:
      TORCH_CHECK(false, "paged_attention: float32, bfloat16 or float16");
  }
}

}  // namespace

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& row_seq, const at::Tensor& row_len,
                     double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes(),
              "q and out: contiguous [rows, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "caches: contiguous [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type(), "one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables: int64 [sequences, max_blocks]");
  TORCH_CHECK(row_seq.scalar_type() == at::kLong && row_len.scalar_type() == at::kLong && row_seq.is_contiguous() &&
                  row_len.is_contiguous() && (row_seq.numel() == q.size(0) || row_seq.numel() == 0) &&
                  row_len.numel() == q.size(0),
              "row_seq (empty: row i reads table row i), row_len: int64 [rows]");
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && heads % kv_heads == 0, "head_dim and GQA groups must match");
  const int64_t* len = row_len.data_ptr<int64_t>();
  const int64_t* seq = row_seq.numel() ? row_seq.data_ptr<int64_t>() : nullptr;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t num_blocks = k_cache.size(0), table_stride = block_tables.stride(0);
  for (int64_t r = 0; r < rows; ++r) {  // a wrong index would read outside the cache: check them all
    const int64_t table_row = seq != nullptr ? seq[r] : r;
    TORCH_CHECK(table_row >= 0 && table_row < block_tables.size(0), "row_seq out of the block tables");
    TORCH_CHECK(len[r] >= 1 && len[r] <= block_tables.size(1) * block_size, "context length out of the table");
    for (int64_t b = 0; b < (len[r] + block_size - 1) / block_size; ++b) {
      const int64_t block = tables[table_row * table_stride + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block id out of the cache");
    }
  }
  const float s = static_cast<float>(scale);
  switch (d) {
    case 64:
      return dispatch<64>(out, q, k_cache, v_cache, tables, table_stride, seq, len, s);
    case 128:
      return dispatch<128>(out, q, k_cache, v_cache, tables, table_stride, seq, len, s);
    default:
      return dispatch<0>(out, q, k_cache, v_cache, tables, table_stride, seq, len, s);
  }
}

}  // namespace strata_cpu
