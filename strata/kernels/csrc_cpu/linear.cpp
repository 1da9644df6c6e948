// Linear layers over block-quantized weights on CPU: y = x W^T (+ b), W [N, K] in blocks of 32 along K.
//
// The canonical formats (strata/kernels/quantized.py builds them; its PyTorch reference is this file's oracle):
//   int8: qs int8 [N, K], d fp16 [N, K/32]                w = d * q            (GGUF's Q8_0, split)
//   int4: qs uint8 [N, K/2], d, m fp16 [N, K/32]          w = d * q + m, q in 0..15 (GGUF's Q4_1, split;
//         byte j of a block holds element j in its low nibble and element j + 16 in its high nibble)
//
// A decode step multiplies a few activation rows by every weight of the model: the weights stream from memory
// once per step, and the kernel must keep that stream at the memory's pace. So the weights are repacked once at
// load time (pack_int8, pack_int4) into groups of 8 columns, one contiguous record per group and block:
//   int4: 128 bytes of nibbles, then d[8] and m[8] as fp16 (160 bytes)
//   int8: 256 bytes, then d[8] as fp16 (272 bytes)
// In both, 32 consecutive bytes hold, for each of the 8 columns in turn, 4 consecutive values along K (int4: two
// such chunks per byte, chunk j in the low nibbles and chunk j + 4 in the high ones). Multiplying such a vector
// by 4 activation bytes broadcast to every 32-bit lane, with AVX2's byte multiply-add, leaves each lane holding
// its column's partial dot product: one group's 8 results build up in the 8 lanes of one register, with no
// horizontal sums, and each block's two scales apply to all 8 columns in one multiply.
//
// The activations are quantized on the fly, per row and per block of 32, to int8 with a float scale
// (x ~ dx * qx), so that a block's dot product is integer arithmetic (llama.cpp computes its Q4/Q8 formats the
// same way). One AVX2 instruction multiplies and pairwise-adds 32 byte products where float FMAs take four, so
// the same kernel also serves prefill chunks (at 512 rows, int4 runs faster than float32 oneDNN on the same
// cores: make bench-quant). Each output row depends only on its own input row: a request's result does not
// change with the rows it shares a batch with, or with how its prompt was chunked.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define STRATA_AVX2 1
#endif

namespace strata_cpu {

namespace {

constexpr int64_t QK = 32;        // values per block
constexpr int64_t COLS = 8;       // columns per packed group
constexpr int64_t ROWS = 4;       // activation rows per pass over a group's weights
constexpr int64_t INT4_RECORD = COLS * QK / 2 + 2 * COLS * 2;  // nibbles, d, m: 160 bytes
constexpr int64_t INT8_RECORD = COLS * QK + COLS * 2;          // bytes, d: 272 bytes
constexpr int64_t PREFETCH = 4096;  // bytes ahead of the record being read (the next groups of this thread)

inline int64_t record_bytes(bool int4) { return int4 ? INT4_RECORD : INT8_RECORD; }

// Activations quantized per row and block: q int8 [rows, K], d [rows, K/32] scales, s = d * sum(q).
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

thread_local Activations activations;  // reused between calls: no allocation per layer

template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t k, int64_t stride, Activations& a) {
  const int64_t nb = k / QK;
  a.q.resize(rows * k);
  a.d.resize(rows * nb);
  a.s.resize(rows * nb);
  at::parallel_for(0, rows * nb, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / nb, b = i % nb;
      const T* src = x + r * stride + b * QK;
      float v[QK];
      float amax = 0.f;
      for (int64_t j = 0; j < QK; ++j) {
        v[j] = static_cast<float>(src[j]);
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = a.q.data() + r * k + b * QK;
      int sum = 0;
      for (int64_t j = 0; j < QK; ++j) {
        const int qv = static_cast<int>(std::nearbyint(v[j] * id));  // round half to even, as torch.round
        q[j] = static_cast<int8_t>(qv);
        sum += qv;
      }
      a.d[i] = d;
      a.s[i] = d * static_cast<float>(sum);
    }
  });
}

inline float half_to_float(uint16_t bits) {
#ifdef STRATA_AVX2
  return _cvtsh_ss(bits);
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- one group of 8 columns against R activation rows: out[r * 8 + c] ------------------------------------------

#ifdef STRATA_AVX2
template <bool INT4, int R>
void group_avx2(const uint8_t* rec, int64_t nb, const Activations& a, int64_t row0, int64_t k, float* out) {
  const int8_t* xq = a.q.data() + row0 * k;
  const float* xd = a.d.data() + row0 * nb;
  const float* xs = a.s.data() + row0 * nb;
  __m256 acc[R], offset[R];
  for (int r = 0; r < R; ++r) acc[r] = offset[r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < nb; ++b, rec += record_bytes(INT4)) {
    _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + 64), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + 128), _MM_HINT_T0);
    if constexpr (!INT4) {
      _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + 192), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + 256), _MM_HINT_T0);
    }
    __m256i sum[R];
    for (int r = 0; r < R; ++r) sum[r] = _mm256_setzero_si256();
    if constexpr (INT4) {
      // int16 sums are safe: 8 chunk products of at most 2 * 15 * 127 each.
      for (int j = 0; j < 4; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + j * 32));
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int r = 0; r < R; ++r) {
          const int8_t* x = xq + r * k + b * QK;
          const __m256i x_lo = _mm256_set1_epi32(load4(x + 4 * j)), x_hi = _mm256_set1_epi32(load4(x + 4 * (j + 4)));
          sum[r] = _mm256_add_epi16(sum[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo),
                                                              _mm256_maddubs_epi16(hi, x_hi)));
        }
      }
      for (int r = 0; r < R; ++r) sum[r] = _mm256_madd_epi16(sum[r], ones);
    } else {
      // Signed weights: |w| times x with w's sign (AVX2 multiplies unsigned by signed bytes); int32 sums.
      for (int j = 0; j < 8; ++j) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + j * 32));
        const __m256i v_abs = _mm256_sign_epi8(v, v);
        for (int r = 0; r < R; ++r) {
          const __m256i x = _mm256_set1_epi32(load4(xq + r * k + b * QK + 4 * j));
          const __m256i p = _mm256_maddubs_epi16(v_abs, _mm256_sign_epi8(x, v));
          sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, ones));
        }
      }
    }
    const int64_t scales_at = INT4 ? COLS * QK / 2 : COLS * QK;
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + scales_at)));
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_mul_ps(d, _mm256_set1_ps(xd[r * nb + b])), acc[r]);
    }
    if constexpr (INT4) {
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + scales_at + 16)));
      for (int r = 0; r < R; ++r) offset[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xs[r * nb + b]), offset[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * COLS, _mm256_add_ps(acc[r], offset[r]));
}
#endif

// The same arithmetic in plain C++ (machines without AVX2).
template <bool INT4>
void group_scalar(const uint8_t* rec, int64_t nb, const Activations& a, int64_t row0, int64_t rows, int64_t k,
                  float* out) {
  for (int64_t i = 0; i < rows * COLS; ++i) out[i] = 0.f;
  for (int64_t b = 0; b < nb; ++b, rec += record_bytes(INT4)) {
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(rec + (INT4 ? COLS * QK / 2 : COLS * QK));
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* x = a.q.data() + (row0 + r) * k + b * QK;
      const float dx = a.d[(row0 + r) * (k / QK) + b], sx = a.s[(row0 + r) * (k / QK) + b];
      for (int64_t c = 0; c < COLS; ++c) {
        int32_t dot = 0;
        for (int64_t j = 0; j < 8; ++j) {
          for (int64_t e = 0; e < 4; ++e) {
            int32_t w;
            if constexpr (INT4) {
              const uint8_t byte = rec[(j % 4) * 32 + c * 4 + e];
              w = j < 4 ? (byte & 0x0F) : (byte >> 4);
            } else {
              w = static_cast<int8_t>(rec[j * 32 + c * 4 + e]);
            }
            dot += w * x[4 * j + e];
          }
        }
        float v = half_to_float(scales[c]) * dx * static_cast<float>(dot);
        if constexpr (INT4) v += half_to_float(scales[COLS + c]) * sx;
        out[r * COLS + c] += v;
      }
    }
  }
}

template <bool INT4>
void group_rows(const uint8_t* rec, int64_t nb, const Activations& a, int64_t row0, int64_t rows, int64_t k,
                float* out) {
#ifdef STRATA_AVX2
  switch (rows) {
    case 1: return group_avx2<INT4, 1>(rec, nb, a, row0, k, out);
    case 2: return group_avx2<INT4, 2>(rec, nb, a, row0, k, out);
    case 3: return group_avx2<INT4, 3>(rec, nb, a, row0, k, out);
    default: return group_avx2<INT4, 4>(rec, nb, a, row0, k, out);
  }
#else
  group_scalar<INT4>(rec, nb, a, row0, rows, k, out);
#endif
}

struct Packed {
  bool int4;
  int64_t n, k, nb, groups;
  const uint8_t* data;
};

Packed check_packed(const at::Tensor& packed, int64_t n, int64_t k, bool int4) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.is_contiguous(),
              "packed weight: uint8 [groups, K/32, record]");
  TORCH_CHECK(k % QK == 0 && n > 0, "packed weight: K a multiple of 32");
  const int64_t groups = (n + COLS - 1) / COLS, nb = k / QK;
  TORCH_CHECK(packed.size(0) == groups && packed.size(1) == nb && packed.size(2) == record_bytes(int4),
              "packed weight: shape does not match N, K and the format");
  return Packed{int4, n, k, nb, groups, packed.data_ptr<uint8_t>()};
}

void check_scales(const at::Tensor& t, int64_t n, int64_t k, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kHalf && t.is_contiguous() && t.dim() == 2 && t.size(0) == n &&
                  t.size(1) == k / QK,
              what, ": float16 [N, K/32]");
}

// The integer code of element e of a canonical row (row_bytes: K for int8, K/2 for int4).
inline int32_t code_at(const uint8_t* row, bool int4, int64_t e) {
  if (!int4) return static_cast<int8_t>(row[e]);
  const int64_t b = e / QK, j = e % QK;
  const uint8_t byte = row[b * QK / 2 + j % (QK / 2)];
  return j < QK / 2 ? (byte & 0x0F) : (byte >> 4);
}

at::Tensor pack(const at::Tensor& qs, const at::Tensor& d, const std::optional<at::Tensor>& m, bool int4) {
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.scalar_type() == (int4 ? at::kByte : at::kChar),
              "pack: qs int8 [N, K] or uint8 [N, K/2]");
  const int64_t n = qs.size(0), k = int4 ? qs.size(1) * 2 : qs.size(1), nb = k / QK;
  TORCH_CHECK(k % QK == 0, "pack: K must be a multiple of 32");
  check_scales(d, n, k, "d");
  if (int4) check_scales(*m, n, k, "m");
  const int64_t groups = (n + COLS - 1) / COLS, rec = record_bytes(int4);
  at::Tensor out = at::zeros({groups, nb, rec}, qs.options().dtype(at::kByte));  // missing columns: all zero
  uint8_t* o = out.data_ptr<uint8_t>();
  const uint8_t* codes = static_cast<const uint8_t*>(qs.data_ptr());
  const int64_t row_bytes = qs.size(1);
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<c10::Half>());
  const uint16_t* mp = int4 ? reinterpret_cast<const uint16_t*>(m->data_ptr<c10::Half>()) : nullptr;
  at::parallel_for(0, groups * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / nb, b = i % nb;
      uint8_t* r = o + i * rec;
      uint16_t* scales = reinterpret_cast<uint16_t*>(r + (int4 ? COLS * QK / 2 : COLS * QK));
      for (int64_t c = 0; c < COLS && g * COLS + c < n; ++c) {
        const int64_t col = g * COLS + c;
        for (int64_t j = 0; j < 8; ++j)
          for (int64_t e = 0; e < 4; ++e) {
            const int32_t q = code_at(codes + col * row_bytes, int4, b * QK + 4 * j + e);
            if (int4) r[(j % 4) * 32 + c * 4 + e] |= static_cast<uint8_t>(j < 4 ? q : q << 4);
            else r[j * 32 + c * 4 + e] = static_cast<uint8_t>(static_cast<int8_t>(q));
          }
        scales[c] = dp[col * nb + b];
        if (int4) scales[COLS + c] = mp[col * nb + b];
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor pack_int8(const at::Tensor& qs, const at::Tensor& d) { return pack(qs, d, std::nullopt, false); }

at::Tensor pack_int4(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) { return pack(qs, d, m, true); }

at::Tensor linear_packed(const at::Tensor& x, const at::Tensor& packed, int64_t n, bool int4,
                         const std::optional<at::Tensor>& bias) {
  const int64_t k = packed.size(1) * QK;
  const Packed w = check_packed(packed, n, k, int4);
  TORCH_CHECK(x.size(-1) == k, "linear: input features ", x.size(-1), " != the weight's ", k);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "linear: float32, bfloat16 or float16 input");
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t rows = x2.size(0), stride = x2.stride(0);
  switch (x2.scalar_type()) {
    case at::kFloat: quantize_rows(x2.data_ptr<float>(), rows, k, stride, activations); break;
    case at::kBFloat16: quantize_rows(x2.data_ptr<c10::BFloat16>(), rows, k, stride, activations); break;
    default: quantize_rows(x2.data_ptr<c10::Half>(), rows, k, stride, activations); break;
  }
  const Activations& a = activations;
  at::Tensor y = at::empty({rows, n}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.groups, 1, [&](int64_t g0, int64_t g1) {
    float tile[ROWS * COLS];
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* rec = w.data + g * w.nb * record_bytes(int4);
      const int64_t cols = std::min(COLS, n - g * COLS);
      for (int64_t m0 = 0; m0 < rows; m0 += ROWS) {
        const int64_t mr = std::min(ROWS, rows - m0);
        if (int4) group_rows<true>(rec, w.nb, a, m0, mr, k, tile);
        else group_rows<false>(rec, w.nb, a, m0, mr, k, tile);
        for (int64_t r = 0; r < mr; ++r) std::memcpy(yp + (m0 + r) * n + g * COLS, tile + r * COLS, cols * 4);
      }
    }
  });
  at::Tensor out = y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
  if (bias.has_value() && bias->defined()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

}  // namespace strata_cpu
