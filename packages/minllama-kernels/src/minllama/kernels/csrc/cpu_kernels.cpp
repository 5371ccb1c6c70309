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
// Weights and the KV cache are fp32 or bf16 (W); activations are fp32 throughout, so a bf16 model computes
// exactly what the fp32 model computes on its bf16-rounded weights, except that its cache stores keys and values
// rounded to bf16 (as core's StaticKVCache does).
#include <torch/extension.h>

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
        float dot = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * to_float(kh[s * head_dim + d]);
        p[s] = dot * scale;
        max_score = std::max(max_score, p[s]);
      }
      float total = 0.f;  // softmax, shifted by the max so that exp never overflows
      for (int64_t s = 0; s < n_slots; ++s) total += (p[s] = std::exp(p[s] - max_score));
      float* oh = out + h * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) oh[d] = 0.f;
      for (int64_t s = 0; s < n_slots; ++s) {  // the weighted sum of the values
        const float weight = p[s] / total;
        for (int64_t d = 0; d < head_dim; ++d) oh[d] += weight * to_float(vh[s * head_dim + d]);
      }
    }
  });
}

template <typename W>
const W* ptr(const torch::Tensor& t) { return reinterpret_cast<const W*>(t.data_ptr()); }

template <typename W>
void layer_step(float* x, const std::vector<torch::Tensor>& w, torch::Tensor& k_cache, torch::Tensor& v_cache,
                   const float* rope, int64_t pos, float eps, int64_t n_heads) {
  const torch::Tensor &attention_norm = w[0], &wq = w[1], &wk = w[2], &wv = w[3], &wo = w[4];
  const torch::Tensor &ffn_norm = w[5], &w1 = w[6], &w2 = w[7], &w3 = w[8];
  const int64_t dim = wq.size(1), n_kv_heads = k_cache.size(1), capacity = k_cache.size(2);
  const int64_t head_dim = k_cache.size(3), kv_dim = n_kv_heads * head_dim, hidden = w1.size(0);
  std::vector<float> n(dim), q(n_heads * head_dim), k(kv_dim), v(kv_dim), y(std::max(dim, n_heads * head_dim));
  std::vector<float> gate(hidden), up(hidden);

  // attention
  rmsnorm(x, ptr<W>(attention_norm), dim, eps, n.data());
  gemv_rows(ptr<W>(wq), n.data(), q.data(), n_heads * head_dim, dim);  // (n_heads * head_dim)
  gemv_rows(ptr<W>(wk), n.data(), k.data(), kv_dim, dim);              // (n_kv_heads * head_dim)
  gemv_rows(ptr<W>(wv), n.data(), v.data(), kv_dim, dim);
  rotate(q.data(), n_heads, head_dim, rope);
  rotate(k.data(), n_kv_heads, head_dim, rope);
  W* kc = reinterpret_cast<W*>(k_cache.data_ptr());  // (1, n_kv_heads, capacity, head_dim): write slot `pos`
  W* vc = reinterpret_cast<W*>(v_cache.data_ptr());
  for (int64_t h = 0; h < n_kv_heads; ++h)
    for (int64_t d = 0; d < head_dim; ++d) {
      kc[(h * capacity + pos) * head_dim + d] = static_cast<W>(k[h * head_dim + d]);
      vc[(h * capacity + pos) * head_dim + d] = static_cast<W>(v[h * head_dim + d]);
    }
  attend<W>(q.data(), kc, vc, n_heads, n_kv_heads, capacity, head_dim, pos + 1, y.data());
  gemv_rows(ptr<W>(wo), y.data(), n.data(), dim, n_heads * head_dim);  // n: reused for the output
  for (int64_t d = 0; d < dim; ++d) x[d] += n[d];

  // feed-forward (SwiGLU)
  rmsnorm(x, ptr<W>(ffn_norm), dim, eps, n.data());
  gemv_rows(ptr<W>(w1), n.data(), gate.data(), hidden, dim);
  gemv_rows(ptr<W>(w3), n.data(), up.data(), hidden, dim);
  for (int64_t i = 0; i < hidden; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];  // silu(g) * u
  gemv_rows(ptr<W>(w2), gate.data(), n.data(), dim, hidden);
  for (int64_t d = 0; d < dim; ++d) x[d] += n[d];
}

}  // namespace

// x: (K,) fp32, weight: (N, K) fp32 or bf16, contiguous -> (N,) fp32
torch::Tensor gemv(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be a contiguous fp32 vector");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(0),
              "weight must be a contiguous (N, K) matrix with K = len(x)");
  const int64_t N = weight.size(0), K = weight.size(1);
  auto y = torch::empty({N}, x.options());
  if (weight.scalar_type() == torch::kFloat) {
    gemv_rows(weight.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), N, K);
  } else if (weight.scalar_type() == torch::kBFloat16) {
    gemv_rows(weight.data_ptr<at::BFloat16>(), x.data_ptr<float>(), y.data_ptr<float>(), N, K);
  } else {
    TORCH_CHECK(false, "weight must be fp32 or bf16, got ", weight.scalar_type());
  }
  return y;
}

// One decoder layer for one token at position `pos`, in place: x (dim,) fp32 is the residual stream; keys and
// values go to slot `pos` of k_cache, v_cache (1, n_kv_heads, capacity, head_dim). weights: attention_norm, wq,
// wk, wv, wo, ffn_norm, w1, w2, w3, all contiguous and of the caches' dtype. rope: (head_dim/2, 2) fp32.
void decoder_layer(torch::Tensor x, std::vector<torch::Tensor> weights, torch::Tensor k_cache,
                   torch::Tensor v_cache, torch::Tensor rope, int64_t pos, double eps, int64_t n_heads) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x must be a contiguous fp32 vector");
  TORCH_CHECK(weights.size() == 9, "weights: attention_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "k_cache, v_cache: contiguous (1, n_kv_heads, capacity, head_dim)");
  TORCH_CHECK(0 <= pos && pos < k_cache.size(2), "pos ", pos, " is outside the cache of ", k_cache.size(2));
  TORCH_CHECK(rope.scalar_type() == torch::kFloat && rope.is_contiguous() && rope.numel() == k_cache.size(3),
              "rope must be this position's contiguous fp32 (head_dim/2, 2) table row");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "weights and cache must be fp32 or bf16");
  for (const auto& w : weights)
    TORCH_CHECK(w.scalar_type() == dtype && w.is_contiguous(), "every weight must be contiguous and of the cache's dtype");
  TORCH_CHECK(weights[1].size(0) == n_heads * k_cache.size(3) && weights[1].size(1) == x.size(0) &&
              n_heads % k_cache.size(1) == 0, "wq must be (n_heads * head_dim, dim), n_heads a multiple of n_kv_heads");
  if (dtype == torch::kFloat)
    layer_step<float>(x.data_ptr<float>(), weights, k_cache, v_cache, rope.data_ptr<float>(), pos, eps, n_heads);
  else
    layer_step<at::BFloat16>(x.data_ptr<float>(), weights, k_cache, v_cache, rope.data_ptr<float>(), pos, eps, n_heads);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = weight @ x for one token: x (K,) fp32, weight (N, K) fp32 or bf16 -> (N,) fp32");
  m.def("decoder_layer", &decoder_layer, "one Llama decoder layer for one token, in place (see cpu_kernels.cpp)");
}
