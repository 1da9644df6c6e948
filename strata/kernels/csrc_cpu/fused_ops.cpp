// The small element-wise steps of a decoder layer, each one pass over its rows instead of a chain of
// PyTorch ops: a decode step of a small model spends more time dispatching those ops than computing them.
// Their PyTorch references (strata/kernels/fused.py) are the test oracles and define the rounding: float32
// inside, one rounding to the tensor's dtype where the reference rounds.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

namespace strata_cpu {

namespace {

constexpr int64_t ROW_GRAIN = 4;  // rows per task: a decode step of one or a few rows stays on the calling thread

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// exp(x) as 2^k * 2^f (k an integer, |f| <= 1/2, 2^f by Cephes' exp2f polynomial, relative error ~1e-7), in
// plain arithmetic on floats and bits so that loops over it vectorize; x is clamped to [-87, 88].
inline float fast_exp(float x) {
  const float t = std::min(std::max(x, -87.f), 88.f) * 1.44269504088896341f;  // log2(e)
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

// out = T(x * rsqrt(mean(x^2) + eps)) * w, one row of n values (x, w, out of type T).
template <typename T>
inline void norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    const T normed = round_to<T>(static_cast<float>(x[i]) * inv);
    out[i] = round_to<T>(static_cast<float>(normed) * static_cast<float>(w[i]));
  }
}

template <typename Fn>
void by_dtype(const at::Tensor& t, const char* op, const Fn& fn) {
  switch (t.scalar_type()) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, op, ": float32, bfloat16 or float16");
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.dim() == 1 && w.is_contiguous() && w.size(0) == x.size(1) &&
                  x.scalar_type() == w.scalar_type(),
              op, ": x [rows, n] with unit last stride, weight [n] of the same dtype");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "rms_norm");
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  by_dtype(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * stride, wp, op + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// x += delta (in x's dtype), then return rms_norm(x): the residual add of one sublayer and the norm before
// the next in one pass.
at::Tensor add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(x, weight, "add_rms_norm");
  TORCH_CHECK(x.is_contiguous() && delta.sizes() == x.sizes() && delta.stride(1) == 1 &&
                  delta.scalar_type() == x.scalar_type(),
              "add_rms_norm: x contiguous, delta of x's shape and dtype");
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1), dstride = delta.stride(0);
  by_dtype(x, "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.data_ptr<T>();
    const T* dp = delta.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        T* row = xp + r * n;
        const T* add = dp + r * dstride;
        for (int64_t i = 0; i < n; ++i) row[i] = round_to<T>(static_cast<float>(row[i]) + static_cast<float>(add[i]));
        norm_row(row, wp, op + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// silu(gate) * up for gate_up [rows, 2n] = [gate | up] -> [rows, n].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up [rows, 2n] with unit last stride");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2, stride = gate_up.stride(0);
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  by_dtype(gate_up, "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* g = gp + r * stride;
        const T* u = g + n;
        T* o = op + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const float gv = static_cast<float>(g[i]);
          const T act = round_to<T>(gv / (1.f + fast_exp(-gv)));
          o[i] = round_to<T>(static_cast<float>(act) * static_cast<float>(u[i]));
        }
      }
    });
  });
  return out;
}

// From the fused projection qkv [T, (heads + 2 kv_heads) * d]: q and k rotated (half-split rotary, cos/sin
// of each row's position from cos_sin [positions, 2, d/2]), k and v stored at each row's slot of the caches
// [blocks, block_size, kv_heads, d] (slot < 0: this row stores nothing), q returned as [T, heads, d].
at::Tensor rotary_store_kv(const at::Tensor& qkv, const at::Tensor& cos_sin, const at::Tensor& positions,
                           const at::Tensor& slots, at::Tensor& k_cache, at::Tensor& v_cache, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rotary_store_kv: qkv [T, width] with unit last stride");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.scalar_type() == qkv.scalar_type(),
              "rotary_store_kv: contiguous caches [blocks, block_size, kv_heads, d] of qkv's dtype");
  const int64_t rows = qkv.size(0), kv_heads = k_cache.size(2), d = k_cache.size(3), half = d / 2;
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * d && d % 2 == 0, "rotary_store_kv: qkv width");
  TORCH_CHECK(cos_sin.dim() == 3 && cos_sin.is_contiguous() && cos_sin.size(1) == 2 && cos_sin.size(2) == half &&
                  cos_sin.scalar_type() == qkv.scalar_type(),
              "rotary_store_kv: cos_sin [positions, 2, d/2] of qkv's dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && positions.is_contiguous() &&
                  slots.is_contiguous() && positions.numel() == rows && slots.numel() == rows,
              "rotary_store_kv: positions, slots int64 [T]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1), max_pos = cos_sin.size(0);
  for (int64_t r = 0; r < rows; ++r) {  // a wrong index would write outside the cache: check them all
    TORCH_CHECK(pos[r] >= 0 && pos[r] < max_pos, "rotary_store_kv: position out of the table");
    TORCH_CHECK(slot[r] < num_slots, "rotary_store_kv: slot out of the cache");
  }
  at::Tensor q_out = at::empty({rows, heads, d}, qkv.options());
  const int64_t stride = qkv.stride(0);
  by_dtype(qkv, "rotary_store_kv", [&](auto tag) {
    using T = decltype(tag);
    const T* src = qkv.data_ptr<T>();
    const T* table = cos_sin.data_ptr<T>();
    T* q = q_out.data_ptr<T>();
    T* kc = k_cache.data_ptr<T>();
    T* vc = v_cache.data_ptr<T>();
    // x1 c - x2 s and x2 c + x1 s, each product rounded to T as the reference's element-wise ops.
    auto rotate = [&](const T* in, T* out, const T* cs) {
      const T* c = cs;
      const T* s = cs + half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = static_cast<float>(in[i]), x2 = static_cast<float>(in[i + half]);
        const float cv = static_cast<float>(c[i]), sv = static_cast<float>(s[i]);
        const float a = static_cast<float>(round_to<T>(x1 * cv)), b = static_cast<float>(round_to<T>(x2 * sv));
        const float e = static_cast<float>(round_to<T>(x2 * cv)), f = static_cast<float>(round_to<T>(x1 * sv));
        out[i] = round_to<T>(a - b);
        out[i + half] = round_to<T>(e + f);
      }
    };
    at::parallel_for(0, rows, ROW_GRAIN, [&](int64_t r0, int64_t r1) {
      T k_rot[1024];
      TORCH_CHECK(d <= 1024, "rotary_store_kv: head_dim above 1024");
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = src + r * stride;
        const T* cs = table + pos[r] * 2 * half;
        for (int64_t h = 0; h < heads; ++h) rotate(row + h * d, q + (r * heads + h) * d, cs);
        if (slot[r] < 0) continue;
        T* kdst = kc + slot[r] * kv_heads * d;
        T* vdst = vc + slot[r] * kv_heads * d;
        const T* k = row + heads * d;
        const T* v = k + kv_heads * d;
        for (int64_t h = 0; h < kv_heads; ++h) {
          rotate(k + h * d, k_rot, cs);
          for (int64_t i = 0; i < d; ++i) kdst[h * d + i] = k_rot[i];
        }
        for (int64_t i = 0; i < kv_heads * d; ++i) vdst[i] = v[i];
      }
    });
  });
  return q_out;
}

}  // namespace strata_cpu
