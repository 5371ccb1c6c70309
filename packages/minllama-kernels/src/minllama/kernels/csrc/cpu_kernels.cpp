// CPU kernels for batch-1 decoding: the GEMV of gemv.h as a PyTorch op, and one whole decoder layer for one token.
//
// Why a whole layer in C++: a decode step of SmolLM2-135M is 30 layers of ~20 small PyTorch operations each, plus
// the Python between them. Each operation costs microseconds of dispatch for nanoseconds of arithmetic (one token
// is a vector, not a matrix), and together they cost as much as reading the weights. Here a layer is one call:
// the same steps as core's TransformerBlock (model.py), in the same order, on fp32 vectors, with the matrix-vector
// products spread over the threads and everything else (a few thousand numbers) done in place on one.
//
//   x += wo . attend(rope(wq . n), cache <- (rope(wk . n), wv . n))      n = rmsnorm(x) * attention_norm
//   x += w2 . (silu(w1 . m) * (w3 . m))                                  m = rmsnorm(x) * ffn_norm
//
// Weight matrices are fp32, bf16, or int8 with one scale per output row (minllama-quant's "int8" scheme); norms and
// the KV cache are fp32 or bf16. Activations are fp32 throughout, so a bf16 model computes exactly what the fp32
// model computes on its bf16-rounded weights, except that its cache stores keys and values rounded to bf16 (as
// core's StaticKVCache does), and an int8 model what the fp32 model computes on its dequantized weights.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gemv.h"

namespace {

using minllama::gemv_rows;

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// out = x / rms(x) * weight, over D channels (model.py's RMSNorm; the mean of squares in fp32).
template <typename W>
void rmsnorm(const float* x, const W* weight, int64_t D, float eps, float* out) {
  float sum_sq = 0.f;
  for (int64_t d = 0; d < D; ++d) sum_sq += x[d] * x[d];
  const float scale = 1.f / std::sqrt(sum_sq / D + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = x[d] * scale * to_float(weight[d]);
}

void rmsnorm(const float* x, const torch::Tensor& weight, float eps, float* out) {
  if (weight.scalar_type() == torch::kFloat)
    rmsnorm(x, weight.data_ptr<float>(), weight.numel(), eps, out);
  else
    rmsnorm(x, weight.data_ptr<at::BFloat16>(), weight.numel(), eps, out);
}

// y = W x for one weight matrix in any of the layouts the GEMV reads: fp32, bf16, or int8 with one fp32 scale per
// row (``scales``, undefined for the float layouts).
void matvec(const torch::Tensor& w, const torch::Tensor& scales, const float* x, float* y) {
  const int64_t N = w.size(0), K = w.size(1);
  switch (w.scalar_type()) {
    case torch::kFloat: gemv_rows(w.data_ptr<float>(), x, y, N, K); break;
    case torch::kBFloat16: gemv_rows(w.data_ptr<at::BFloat16>(), x, y, N, K); break;
    default: {  // int8 (checked by the caller)
      gemv_rows(w.data_ptr<int8_t>(), x, y, N, K);
      const float* s = scales.data_ptr<float>();
      for (int64_t n = 0; n < N; ++n) y[n] *= s[n];
    }
  }
}

// The checks every weight matrix passes before its pointer is read: a contiguous (N, K) fp32/bf16 matrix, or an
// int8 one with (N,) fp32 scales.
void check_matrix(const torch::Tensor& w, const torch::Tensor& scales, int64_t K, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == K, name, " must be a contiguous (N, ", K,
              ") matrix, got ", w.sizes());
  const auto t = w.scalar_type();
  TORCH_CHECK(t == torch::kFloat || t == torch::kBFloat16 || t == torch::kChar, name,
              " must be fp32, bf16 or int8, got ", t);
  TORCH_CHECK((t == torch::kChar) == scales.defined(), name, ": int8 weights need scales, float weights none");
  if (scales.defined())
    TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.numel() == w.size(0),
                name, ": scales must be contiguous fp32 (N,)");
}

// Rotate each channel pair (2i, 2i+1) of each head by its angle (Meta's layout, model.py's apply_rope).
// rope: (head_dim/2, 2) = cos, sin of this position's angles.
void rotate(float* x, int64_t heads, int64_t head_dim, const float* rope) {
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * head_dim;
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float c = rope[2 * i], s = rope[2 * i + 1], x0 = xh[2 * i], x1 = xh[2 * i + 1];
      xh[2 * i] = x0 * c - x1 * s;
      xh[2 * i + 1] = x1 * c + x0 * s;
    }
  }
}

// 16 numbers of a cached key or value (or of q) as fp32; `mask` keeps the valid lanes at the end of a head.
inline __m512 load_floats(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load_floats(const at::BFloat16* p, __mmask16 mask) {
  __m256i raw = _mm256_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));  // bf16 -> fp32, exact
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

// q . k over n channels, 16 at a time. (Written out: the compiler does not vectorize a float sum on its own,
// because that reorders the additions; at a 512-token context these dot products are most of attention.)
template <typename C>
inline float dot(const float* q, const C* k, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16)
    acc = _mm512_fmadd_ps(load_floats(q + d, lanes(n - d)), load_floats(k + d, lanes(n - d)), acc);
  return _mm512_reduce_add_ps(acc);
}

// out += weight * v over n channels.
template <typename C>
inline void add_scaled(float weight, const C* v, float* out, int64_t n) {
  const __m512 w = _mm512_set1_ps(weight);
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = lanes(n - d);
    _mm512_mask_storeu_ps(out + d, m, _mm512_fmadd_ps(w, load_floats(v + d, m), load_floats(out + d, m)));
  }
}

// One query per head over the cached slots 0 .. n_slots-1 (causal: the new token is the last one).
// q, out: (n_heads, head_dim); k, v: one row's cache, (n_kv_heads, capacity, head_dim). Query head h reads kv head
// h / (n_heads / n_kv_heads) (grouped-query attention). Heads are independent: split over the threads.
template <typename C>
void attend(const float* q, const C* k, const C* v, int64_t n_heads, int64_t n_kv_heads, int64_t capacity,
            int64_t head_dim, int64_t n_slots, float* out) {
  const int64_t group = n_heads / n_kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  at::parallel_for(0, n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(n_slots);  // attention weights of one head
    for (int64_t h = begin; h < end; ++h) {
      const float* qh = q + h * head_dim;
      const C* kh = k + (h / group) * capacity * head_dim;  // (capacity, head_dim)
      const C* vh = v + (h / group) * capacity * head_dim;
      float max_score = -INFINITY;
      for (int64_t s = 0; s < n_slots; ++s) {  // scores q . k_s / sqrt(d)
        p[s] = dot(qh, kh + s * head_dim, head_dim) * scale;
        max_score = std::max(max_score, p[s]);
      }
      float total = 0.f;  // softmax, shifted by the max so that exp never overflows
      for (int64_t s = 0; s < n_slots; ++s) total += (p[s] = std::exp(p[s] - max_score));
      float* oh = out + h * head_dim;
      std::fill(oh, oh + head_dim, 0.f);
      for (int64_t s = 0; s < n_slots; ++s) add_scaled(p[s] / total, vh + s * head_dim, oh, head_dim);  // sum p v
    }
  });
}

// One layer for one token; C is the KV cache's dtype. w: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3;
// scales: the seven matrices' (undefined unless int8).
template <typename C>
void layer_step(float* x, const std::vector<torch::Tensor>& w, const std::vector<torch::Tensor>& scales,
                torch::Tensor& k_cache, torch::Tensor& v_cache, const float* rope, int64_t pos, float eps,
                int64_t n_heads) {
  const int64_t dim = w[1].size(1), n_kv_heads = k_cache.size(1), capacity = k_cache.size(2);
  const int64_t head_dim = k_cache.size(3), kv_dim = n_kv_heads * head_dim, hidden = w[6].size(0);
  std::vector<float> n(dim), q(n_heads * head_dim), k(kv_dim), v(kv_dim), y(n_heads * head_dim);
  std::vector<float> gate(hidden), up(hidden);

  // attention
  rmsnorm(x, w[0], eps, n.data());
  matvec(w[1], scales[0], n.data(), q.data());  // (n_heads * head_dim)
  matvec(w[2], scales[1], n.data(), k.data());  // (n_kv_heads * head_dim)
  matvec(w[3], scales[2], n.data(), v.data());
  rotate(q.data(), n_heads, head_dim, rope);
  rotate(k.data(), n_kv_heads, head_dim, rope);
  C* kc = k_cache.data_ptr<C>();  // (1, n_kv_heads, capacity, head_dim): write slot `pos`
  C* vc = v_cache.data_ptr<C>();
  for (int64_t h = 0; h < n_kv_heads; ++h)
    for (int64_t d = 0; d < head_dim; ++d) {
      kc[(h * capacity + pos) * head_dim + d] = static_cast<C>(k[h * head_dim + d]);
      vc[(h * capacity + pos) * head_dim + d] = static_cast<C>(v[h * head_dim + d]);
    }
  attend<C>(q.data(), kc, vc, n_heads, n_kv_heads, capacity, head_dim, pos + 1, y.data());
  matvec(w[4], scales[3], y.data(), n.data());  // n: reused for the output
  for (int64_t d = 0; d < dim; ++d) x[d] += n[d];

  // feed-forward (SwiGLU)
  rmsnorm(x, w[5], eps, n.data());
  matvec(w[6], scales[4], n.data(), gate.data());
  matvec(w[8], scales[6], n.data(), up.data());
  for (int64_t i = 0; i < hidden; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];  // silu(g) * u
  matvec(w[7], scales[5], gate.data(), n.data());
  for (int64_t d = 0; d < dim; ++d) x[d] += n[d];
}

}  // namespace

// x: (K,) fp32; weight: (N, K) fp32, bf16, or int8 with scales (N,) fp32; contiguous -> (N,) fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> scales) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be a contiguous fp32 vector");
  const torch::Tensor s = scales.value_or(torch::Tensor());
  check_matrix(weight, s, x.size(0), "weight");
  auto y = torch::empty({weight.size(0)}, x.options());
  matvec(weight, s, x.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

// One decoder layer for one token at position `pos`, in place: x (dim,) fp32 is the residual stream; keys and
// values go to slot `pos` of k_cache, v_cache (1, n_kv_heads, capacity, head_dim), fp32 or bf16. weights:
// attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3; scales: one per matrix (None unless it is int8).
// rope: (head_dim/2, 2) fp32, this position's cos and sin.
void decoder_layer(torch::Tensor x, std::vector<torch::Tensor> weights, std::vector<std::optional<torch::Tensor>> scales,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor rope, int64_t pos, double eps,
                   int64_t n_heads) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be a contiguous fp32 vector");
  TORCH_CHECK(weights.size() == 9 && scales.size() == 7,
              "weights: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3; scales: one per matrix");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache, v_cache: contiguous (1, n_kv_heads, capacity, head_dim)");
  const auto cache_dtype = k_cache.scalar_type();
  TORCH_CHECK(cache_dtype == torch::kFloat || cache_dtype == torch::kBFloat16, "the cache must be fp32 or bf16");
  TORCH_CHECK(0 <= pos && pos < k_cache.size(2), "pos ", pos, " is outside the cache of ", k_cache.size(2));
  TORCH_CHECK(rope.scalar_type() == torch::kFloat && rope.is_contiguous() && rope.numel() == k_cache.size(3),
              "rope must be this position's contiguous fp32 (head_dim/2, 2) table row");
  const int64_t dim = x.size(0), head_dim = k_cache.size(3), kv_dim = k_cache.size(1) * head_dim;
  TORCH_CHECK(n_heads % k_cache.size(1) == 0, "n_heads must be a multiple of the cache's n_kv_heads");
  for (int i : {0, 5})
    TORCH_CHECK(weights[i].numel() == dim && weights[i].is_contiguous() &&
                (weights[i].scalar_type() == torch::kFloat || weights[i].scalar_type() == torch::kBFloat16),
                "the norm weights must be contiguous fp32 or bf16 (dim,)");
  std::vector<torch::Tensor> s;
  for (const auto& t : scales) s.push_back(t.value_or(torch::Tensor()));
  const int64_t hidden = weights[6].size(0);
  const int64_t rows[7] = {n_heads * head_dim, kv_dim, kv_dim, dim, hidden, dim, hidden};
  const int64_t cols[7] = {dim, dim, dim, n_heads * head_dim, dim, hidden, dim};
  const char* names[7] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  const int at[7] = {1, 2, 3, 4, 6, 7, 8};  // where each matrix is in `weights`
  for (int i = 0; i < 7; ++i) {
    const torch::Tensor& w = weights[at[i]];
    check_matrix(w, s[i], cols[i], names[i]);
    TORCH_CHECK(w.size(0) == rows[i], names[i], " must have ", rows[i], " rows, got ", w.size(0));
  }
  if (cache_dtype == torch::kFloat)
    layer_step<float>(x.data_ptr<float>(), weights, s, k_cache, v_cache, rope.data_ptr<float>(), pos, eps, n_heads);
  else
    layer_step<at::BFloat16>(x.data_ptr<float>(), weights, s, k_cache, v_cache, rope.data_ptr<float>(), pos, eps, n_heads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = weight @ x for one token: x (K,) fp32, weight (N, K) fp32, bf16 or int8 (with scales)",
        py::arg("x"), py::arg("weight"), py::arg("scales") = py::none());
  m.def("decoder_layer", &decoder_layer, "one Llama decoder layer for one token, in place (see cpu_kernels.cpp)");
}
