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
// Weight matrices are fp32, bf16, int8 with one scale per output row (minllama-quant's "int8" scheme), or blocks of
// 32 4-bit or 8-bit codes with a scale each (quant's "int4", GGUF's Q4_0, Q4_1, Q8_0: blocks.h); norms and the KV
// cache are fp32 or bf16. Activations are fp32 throughout, so a bf16 model computes exactly what the fp32 model
// computes on its bf16-rounded weights, except that its cache stores keys and values rounded to bf16 (as core's
// StaticKVCache does), and a quantized model what the fp32 model computes on its dequantized weights.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "blocks.h"
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

// A weight matrix as Python hands it over, (kind, tensors), checked once and then read by pointer:
//   "float": (w,)               w (N, K) fp32 or bf16, as nn.Linear stores it
//   "int8":  (q, scales)        q (N, K) int8, scales (N,) fp32: w = q * scales[:, None] (minllama-quant's int8)
//   "int4":  (q, scales, mins)  q (N, Kp/2) uint8 (two codes a byte), scales and mins (N, Kp/g) fp16: w = q s + m
//                               per group of g columns, Kp = K rounded up to whole groups (minllama-quant's int4)
//   "q4_0", "q4_1", "q8_0":     (blocks,) (N, K/32 * 18, 20 or 34) uint8: a GGUF tensor's bytes (llama.cpp's
//                               layouts: fp16 d, [fp16 m,] then the 32 codes)
struct Matrix {
  torch::Tensor w, scales;  // float and int8
  bool is_blocks = false;
  minllama::BlockMatrix blocks;
  int64_t N = 0, K = 0;
};

const uint8_t* bytes_of(const torch::Tensor& t) { return static_cast<const uint8_t*>(t.data_ptr()); }

Matrix read_matrix(const std::string& kind, const std::vector<torch::Tensor>& t, int64_t K, const char* name) {
  static const std::vector<std::pair<std::string, size_t>> kinds = {
      {"float", 1}, {"int8", 2}, {"int4", 3}, {"q4_0", 1}, {"q4_1", 1}, {"q8_0", 1}};
  const auto found = std::find_if(kinds.begin(), kinds.end(), [&](const auto& k) { return k.first == kind; });
  TORCH_CHECK(found != kinds.end(), name, ": unknown kind '", kind, "' (float, int8, int4, q4_0, q4_1, q8_0)");
  TORCH_CHECK(t.size() == found->second, name, ": kind ", kind, " takes ", found->second, " tensor(s), got ", t.size());
  for (const auto& x : t)
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), name, ": tensors must be contiguous, on the CPU");
  const torch::Tensor& w = t[0];
  TORCH_CHECK(w.dim() == 2, name, " must be a 2-d (N, ...) matrix, got ", w.sizes());
  Matrix mat;
  mat.N = w.size(0), mat.K = K;
  if (kind == "float" || kind == "int8") {
    TORCH_CHECK(w.size(1) == K, name, " must be a contiguous (N, ", K, ") matrix, got ", w.sizes());
    const auto type = w.scalar_type();
    if (kind == "float") {
      TORCH_CHECK(type == torch::kFloat || type == torch::kBFloat16, name, " must be fp32 or bf16, got ", type,
                  " (int8 weights need scales: kind int8)");
    } else {
      TORCH_CHECK(type == torch::kChar, name, ": int8 weights must be int8, got ", type);
      TORCH_CHECK(t[1].scalar_type() == torch::kFloat && t[1].numel() == mat.N, name, ": scales must be fp32 (N,)");
      mat.scales = t[1];
    }
    mat.w = w;
    return mat;
  }
  for (size_t i = 1; i < t.size(); ++i)  // int4's scales and mins
    TORCH_CHECK(t[i].scalar_type() == torch::kHalf && t[i].dim() == 2 && t[i].size(0) == mat.N &&
                t[i].size(1) == t[1].size(1), name, ": int4 scales and mins must be fp16 (N, groups)");
  TORCH_CHECK(w.scalar_type() == torch::kByte, name, ": ", kind, " codes must be uint8 bytes, got ", w.scalar_type());
  minllama::BlockMatrix& B = mat.blocks;
  mat.is_blocks = true;
  B.N = mat.N;
  B.codes_row = w.size(1);
  if (kind == "int4") {
    const int64_t padded = 2 * w.size(1), groups = t[1].size(1);
    TORCH_CHECK(groups > 0 && padded % groups == 0 && (padded / groups) % 32 == 0, name,
                ": int4 groups must be a multiple of 32 columns");
    const int64_t group = padded / groups;
    TORCH_CHECK(K <= padded && padded - K < group, name, ": int4 codes for ", padded, " columns do not fit K = ", K);
    B.K_padded = padded, B.codes = bytes_of(w), B.codes_block = 16, B.interleaved = true, B.scales_apart = true;
    B.blocks_per_group = group / 32;
    B.d = bytes_of(t[1]), B.d_row = 2 * groups, B.d_group = 2;
    B.m = bytes_of(t[2]), B.m_row = 2 * groups, B.m_group = 2;
    return mat;
  }
  const int64_t block_bytes = kind == "q4_0" ? 18 : kind == "q4_1" ? 20 : 34;
  TORCH_CHECK(K % 32 == 0 && w.size(1) == K / 32 * block_bytes, name, ": a ", kind, " matrix of ", K,
              " columns is (N, ", K / 32 * block_bytes, ") bytes, got ", w.sizes());
  const int64_t code_start = kind == "q4_1" ? 4 : 2;  // after d (and m)
  B.K_padded = K, B.codes = bytes_of(w) + code_start, B.codes_block = block_bytes;
  B.d = bytes_of(w), B.d_row = w.size(1), B.d_group = block_bytes;
  if (kind == "q4_1") B.m = bytes_of(w) + 2, B.m_row = w.size(1), B.m_group = block_bytes;
  B.m_per_d = kind == "q4_0" ? -8.f : 0.f;  // Q4_0: w = d (q - 8); Q8_0: w = d q
  B.bytes = kind == "q8_0";
  return mat;
}

// y = W x for one matrix in any of those layouts. x is a BlockInput: the block layouts round it (or rearrange it)
// once for all the matrices that multiply the same vector.
void matvec(const Matrix& mat, minllama::BlockInput& x, float* y) {
  if (mat.is_blocks) return x.multiply(mat.blocks, y);
  switch (mat.w.scalar_type()) {
    case torch::kFloat: gemv_rows(mat.w.data_ptr<float>(), x.data(), y, mat.N, mat.K); break;
    case torch::kBFloat16: gemv_rows(mat.w.data_ptr<at::BFloat16>(), x.data(), y, mat.N, mat.K); break;
    default: {  // int8
      gemv_rows(mat.w.data_ptr<int8_t>(), x.data(), y, mat.N, mat.K);
      const float* s = mat.scales.data_ptr<float>();
      for (int64_t n = 0; n < mat.N; ++n) y[n] *= s[n];
    }
  }
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

// One layer's weights, checked: its two norms and seven matrices.
struct Layer {
  torch::Tensor attention_norm, ffn_norm;
  Matrix wq, wk, wv, wo, w1, w2, w3;
};

// One layer for one token; C is the KV cache's dtype (fp32 or bf16).
template <typename C>
void layer_step(float* x, const Layer& L, torch::Tensor& k_cache, torch::Tensor& v_cache, const float* rope,
                int64_t pos, float eps, int64_t n_heads) {
  const int64_t dim = L.wq.K, n_kv_heads = k_cache.size(1), capacity = k_cache.size(2);
  const int64_t head_dim = k_cache.size(3), kv_dim = n_kv_heads * head_dim, hidden = L.w1.N;
  std::vector<float> n(dim), q(n_heads * head_dim), k(kv_dim), v(kv_dim), y(n_heads * head_dim);
  std::vector<float> gate(hidden), up(hidden);

  // attention
  rmsnorm(x, L.attention_norm, eps, n.data());
  minllama::BlockInput attention_in(n.data(), dim);  // q, k and v multiply the same vector
  matvec(L.wq, attention_in, q.data());  // (n_heads * head_dim)
  matvec(L.wk, attention_in, k.data());  // (n_kv_heads * head_dim)
  matvec(L.wv, attention_in, v.data());
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
  minllama::BlockInput attention_out(y.data(), n_heads * head_dim);
  matvec(L.wo, attention_out, n.data());  // n: reused for the output
  for (int64_t d = 0; d < dim; ++d) x[d] += n[d];

  // feed-forward (SwiGLU)
  rmsnorm(x, L.ffn_norm, eps, n.data());
  minllama::BlockInput ffn_in(n.data(), dim);  // w1 and w3 multiply the same vector
  matvec(L.w1, ffn_in, gate.data());
  matvec(L.w3, ffn_in, up.data());
  for (int64_t i = 0; i < hidden; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];  // silu(g) * u
  minllama::BlockInput ffn_hidden(gate.data(), hidden);
  matvec(L.w2, ffn_hidden, n.data());
  for (int64_t d = 0; d < dim; ++d) x[d] += n[d];
}

using MatrixSpec = std::pair<std::string, std::vector<torch::Tensor>>;  // (kind, tensors): see Matrix
// attention_norm, ffn_norm, then wq, wk, wv, wo, w1, w2, w3 (cpu_decode.py gathers them)
using LayerSpec = std::tuple<torch::Tensor, torch::Tensor, std::vector<MatrixSpec>>;

// Every layer's weights, checked once and then kept (cpu_decode.py's GatheredWeights holds one for as long as the
// model's modules and tensors stay the same): a step reads their pointers instead of converting and checking ~200
// tensors from Python objects again (75 us per token for 30 layers, measured: 2% of a SmolLM2 4-bit step).
struct DecoderWeights {
  std::vector<Layer> layers;
  int64_t dim = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
};

// One layer's norms and matrices: shapes and dtypes.
Layer read_layer(const LayerSpec& spec, const DecoderWeights& W, int64_t index) {
  const std::string where = "layer " + std::to_string(index) + "'s ";
  Layer L;
  L.attention_norm = std::get<0>(spec), L.ffn_norm = std::get<1>(spec);
  for (const auto* norm : {&L.attention_norm, &L.ffn_norm})
    TORCH_CHECK(norm->numel() == W.dim && norm->is_contiguous() &&
                (norm->scalar_type() == torch::kFloat || norm->scalar_type() == torch::kBFloat16), where,
                "norm weights must be contiguous fp32 or bf16 (dim,)");
  const auto& m = std::get<2>(spec);
  TORCH_CHECK(m.size() == 7, where, "matrices: wq, wk, wv, wo, w1, w2, w3");
  const int64_t q_dim = W.n_heads * W.head_dim, kv_dim = W.n_kv_heads * W.head_dim, hidden = m[4].second.at(0).size(0);
  const int64_t rows[7] = {q_dim, kv_dim, kv_dim, W.dim, hidden, W.dim, hidden};
  const int64_t cols[7] = {W.dim, W.dim, W.dim, q_dim, W.dim, hidden, W.dim};
  const char* names[7] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  Matrix* out[7] = {&L.wq, &L.wk, &L.wv, &L.wo, &L.w1, &L.w2, &L.w3};
  for (int i = 0; i < 7; ++i) {
    const std::string name = where + names[i];
    *out[i] = read_matrix(m[i].first, m[i].second, cols[i], name.c_str());
    TORCH_CHECK(out[i]->N == rows[i], name, " must have ", rows[i], " rows, got ", out[i]->N);
  }
  return L;
}

DecoderWeights decoder_weights(const std::vector<LayerSpec>& layers, int64_t dim, int64_t n_heads,
                               int64_t n_kv_heads, int64_t head_dim) {
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  DecoderWeights W;
  W.dim = dim, W.n_heads = n_heads, W.n_kv_heads = n_kv_heads, W.head_dim = head_dim;
  for (size_t i = 0; i < layers.size(); ++i) W.layers.push_back(read_layer(layers[i], W, i));
  return W;
}

}  // namespace

// x: (K,) fp32; a matrix (kind, tensors) as described at Matrix -> (N,) fp32
torch::Tensor gemv(torch::Tensor x, const std::string& kind, std::vector<torch::Tensor> tensors) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous fp32 vector");
  const Matrix mat = read_matrix(kind, tensors, x.size(0), "weight");
  auto y = torch::empty({mat.N}, x.options());
  minllama::BlockInput input(x.data_ptr<float>(), x.size(0));
  matvec(mat, input, y.data_ptr<float>());
  return y;
}

// The decoder layers for one token at position `pos`, in place: x (dim,) fp32 is the residual stream, and layer
// i's keys and values go to slot `pos` of k_caches[i], v_caches[i] (1, n_kv_heads, capacity, head_dim), fp32 or
// bf16. rope: (head_dim/2, 2) fp32, this position's cos and sin. Every cache is checked before the first layer runs
// (the weights were, when `weights` was made).
void decoder_layers(torch::Tensor x, const DecoderWeights& weights, std::vector<torch::Tensor> k_caches,
                    std::vector<torch::Tensor> v_caches, torch::Tensor rope, int64_t pos, double eps) {
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kFloat && x.is_contiguous() && x.size(0) == weights.dim,
              "x must be a contiguous fp32 vector of ", weights.dim);
  TORCH_CHECK(k_caches.size() == weights.layers.size() && v_caches.size() == weights.layers.size(),
              "one k and v cache per layer");
  TORCH_CHECK(rope.scalar_type() == torch::kFloat && rope.is_contiguous() && rope.numel() == weights.head_dim,
              "rope must be this position's contiguous fp32 (head_dim/2, 2) table row");
  for (size_t i = 0; i < k_caches.size(); ++i) {
    const torch::Tensor &k = k_caches[i], &v = v_caches[i];
    TORCH_CHECK(k.dim() == 4 && k.size(0) == 1 && k.size(1) == weights.n_kv_heads && k.size(3) == weights.head_dim &&
                k.is_contiguous() && v.is_contiguous() && v.sizes() == k.sizes() && v.scalar_type() == k.scalar_type(),
                "layer ", i, "'s k_cache, v_cache: contiguous (1, ", weights.n_kv_heads, ", capacity, ",
                weights.head_dim, ")");
    TORCH_CHECK(k.scalar_type() == torch::kFloat || k.scalar_type() == torch::kBFloat16, "layer ", i,
                "'s cache must be fp32 or bf16");
    TORCH_CHECK(0 <= pos && pos < k.size(2), "pos ", pos, " is outside the cache of ", k.size(2));
  }
  for (size_t i = 0; i < k_caches.size(); ++i) {
    const Layer& L = weights.layers[i];
    if (k_caches[i].scalar_type() == torch::kFloat)
      layer_step<float>(x.data_ptr<float>(), L, k_caches[i], v_caches[i], rope.data_ptr<float>(), pos, eps,
                        weights.n_heads);
    else
      layer_step<at::BFloat16>(x.data_ptr<float>(), L, k_caches[i], v_caches[i], rope.data_ptr<float>(), pos, eps,
                               weights.n_heads);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = W @ x for one token: x (K,) fp32, W given as (kind, tensors) (see cpu_kernels.cpp)",
        py::arg("x"), py::arg("kind"), py::arg("tensors"));
  m.def("set_integer_dot",  // never on where the CPU has no VNNI: vpdpbusd would be an illegal instruction
        [](bool on) { return std::exchange(minllama::integer_dot(), on && __builtin_cpu_supports("avx512vnni")); },
        "4-bit and 8-bit blocks with integer dot products (AVX512-VNNI, x rounded to int8 per block; the default "
        "where the CPU has it; refused, staying fp32, where it has not) or in fp32; returns the previous setting");
  py::class_<DecoderWeights>(m, "DecoderWeights", "every layer's weights, checked once (see cpu_kernels.cpp)")
      .def(py::init(&decoder_weights), py::arg("layers"), py::arg("dim"), py::arg("n_heads"), py::arg("n_kv_heads"),
           py::arg("head_dim"))
      .def("__len__", [](const DecoderWeights& w) { return w.layers.size(); });
  m.def("decoder_layers", &decoder_layers, "Llama decoder layers for one token, in place (see cpu_kernels.cpp)");
}
