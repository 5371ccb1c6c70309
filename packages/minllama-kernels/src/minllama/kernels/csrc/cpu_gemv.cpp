// y = W x for one token: a GEMV that streams the weight matrix once, at the memory bandwidth.
//
// W is row-major (N, K), as nn.Linear stores it, so output n is the dot product of row n with x: each row is read
// front to back, 64 bytes (one cache line, one AVX-512 register of fp32) at a time, and the hardware prefetcher
// sees one sequential stream per row. x (K floats, a few KB) stays in L1 for the whole call. Four rows are done
// together so that each x load feeds four FMAs and four independent accumulator chains hide the FMA latency.
// Rows are split over threads with at::parallel_for (PyTorch's own thread pool, so torch.set_num_threads applies).
//
// bf16 weights: a row of 16 bf16 is loaded (32 bytes), widened to fp32 exactly (a bf16 is the top half of an fp32:
// shift it left by 16 bits), and multiplied with the fp32 x: half the bytes of fp32, the same fp32 arithmetic.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

// 16 weights of row `w` at column k, as fp32; `mask` selects the valid lanes of a ragged tail (K % 16 != 0).
inline __m512 load16(const float* w, int64_t k, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w + k); }

inline __m512 load16(const at::BFloat16* w, int64_t k, __mmask16 mask) {
  __m256i raw = _mm256_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(w) + k);  // 16 x bf16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));           // 16 x fp32, exact
}

// y[n0 .. n0+rows) = W[n0 .. n0+rows) . x for rows <= 4.
template <typename W, int ROWS>
inline void dot_rows(const W* w, int64_t K, const float* x, float* y) {
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_fmadd_ps(load16(w + r * K, k, 0xFFFF), xv, acc[r]);
  }
  if (k < K) {  // the last K % 16 columns, masked
    __mmask16 mask = (__mmask16)((1u << (K - k)) - 1);
    __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_fmadd_ps(load16(w + r * K, k, mask), xv, acc[r]);
  }
  for (int r = 0; r < ROWS; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

template <typename W>
void gemv_rows(const W* w, const float* x, float* y, int64_t N, int64_t K) {
  // grain: at least 64 rows per task, so a thread streams a contiguous slab of W
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + 4 <= end; n += 4) dot_rows<W, 4>(w + n * K, K, x, y + n);
    for (; n < end; ++n) dot_rows<W, 1>(w + n * K, K, x, y + n);
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = weight @ x for one token: x (K,) fp32, weight (N, K) fp32 or bf16 -> (N,) fp32");
}
