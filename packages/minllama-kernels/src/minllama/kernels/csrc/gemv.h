// y = W x for one token: a GEMV that streams the weight matrix once, at the memory bandwidth.
//
// W is row-major (N, K), as nn.Linear stores it, so output n is the dot product of row n with x: each row is read
// front to back, 64 bytes (one cache line, one AVX-512 register of fp32) at a time, and the hardware prefetcher
// sees one sequential stream per row. x (K floats, a few KB) stays in L1 for the whole call.
// Rows are split over threads with at::parallel_for (PyTorch's own thread pool, so torch.set_num_threads applies;
// the extension must be compiled with -fopenmp, or at::parallel_for quietly runs on one thread).
//
// bf16 weights are widened to fp32 exactly and multiplied with the fp32 x: half the bytes of fp32, the same fp32
// arithmetic, so the result is as accurate as fp32 on the bf16-rounded weights.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <type_traits>
#include <vector>

namespace minllama {

// Each step of a row reads one 64-byte cache line: 16 fp32, 32 bf16 or 64 int8 weights.
template <typename W> constexpr int64_t kStep = 64 / sizeof(W);

// 16 fp32 weights (or x values) at p; `mask` keeps the valid lanes of a ragged tail. The full load is written as a
// masked one with every lane on: measured ~7% faster here than a plain load, which the compiler folds into the
// multiply-add as a memory operand (likely split in two by the core: it is an indexed address).
inline __m512 load16(const float* p) { return _mm512_maskz_loadu_ps(0xFFFF, p); }
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// One step of row `w` at column k: acc += w[k .. k+16) * x[k .. k+16).
template <typename... Mask>
inline __m512 fma_step(const float* w, const float* x, int64_t k, __m512 acc, Mask... mask) {
  return _mm512_fmadd_ps(load16(w + k, mask...), load16(x + k, mask...), acc);
}

// 32 bf16 weights at p in one 512-bit integer register (masked: the lanes past a ragged tail are zero).
inline __m512i load32(const at::BFloat16* p) { return _mm512_loadu_si512(p); }
inline __m512i load32(const at::BFloat16* p, __mmask32 mask) {
  return _mm512_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(p));
}

// One step of a bf16 row: 32 weights in one load. A bf16 is the top half of an fp32, and each 32-bit lane holds a
// pair (2j, 2j+1): shifted left by 16 it is weight 2j as an fp32, masked to its top half it is weight 2j+1, both
// exact. `x` was split per 32-column block into its 16 even then its 16 odd columns (split_pairs) to match.
template <typename... Mask>
inline __m512 fma_step(const at::BFloat16* w, const float* x, int64_t k, __m512 acc, Mask... mask) {
  __m512i pairs = load32(w + k, mask...);
  __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(0xFFFF0000)));
  acc = _mm512_fmadd_ps(even, _mm512_loadu_ps(x + k), acc);
  return _mm512_fmadd_ps(odd, _mm512_loadu_ps(x + k + 16), acc);
}

// One step of an int8 row (one scale per row, applied by the caller): 64 weights, four groups of 16 sign-extended
// to 32 bits (the load and the widening are one instruction) and converted to fp32, exactly (|q| <= 127).
inline __m512 fma_step(const int8_t* w, const float* x, int64_t k, __m512 acc) {
  for (int g = 0; g < 4; ++g) {
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 16 * g))));
    acc = _mm512_fmadd_ps(q, _mm512_loadu_ps(x + k + 16 * g), acc);
  }
  return acc;
}

inline __m512 fma_step(const int8_t* w, const float* x, int64_t k, __m512 acc, __mmask64 mask) {
  for (int g = 0; g < 4; ++g) {
    const __mmask16 m = static_cast<__mmask16>(mask >> (16 * g));
    __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w + k + 16 * g)));
    acc = _mm512_fmadd_ps(q, _mm512_maskz_loadu_ps(m, x + k + 16 * g), acc);
  }
  return acc;
}

// y[0 .. ROWS) = W[0 .. ROWS) . x for ROWS consecutive rows starting at w. While it reads them, it asks the cache
// to fetch `ahead` (the rows it will read after the next ones), a share per step: rows are short (1-3 KB), too
// short for the hardware prefetcher to ramp up on its own, and bf16 in particular stalls without it.
template <typename W, int ROWS>
inline void dot_rows(const W* w, int64_t K, const float* x, float* y, const char* ahead, int64_t ahead_bytes) {
  constexpr int64_t S = kStep<W>;
  __m512 acc[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
  const int64_t share = (ahead_bytes / ((K + S - 1) / S) + 63) / 64 * 64;  // bytes to prefetch per step
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    if (share > 0)
      for (int64_t b = 0; b < share; b += 64) _mm_prefetch(ahead + k / S * share + b, _MM_HINT_T0);
    for (int r = 0; r < ROWS; ++r) acc[r] = fma_step(w + r * K, x, k, acc[r]);
  }
  if (k < K) {  // the last K % S columns: masked loads read nothing past the row
    using Mask = std::conditional_t<sizeof(W) == 4, __mmask16, std::conditional_t<sizeof(W) == 2, __mmask32, __mmask64>>;
    const Mask mask = static_cast<Mask>(~0ull >> (64 - (K - k)));  // one bit per valid column
    for (int r = 0; r < ROWS; ++r) acc[r] = fma_step(w + r * K, x, k, acc[r], mask);
  }
  for (int r = 0; r < ROWS; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

// x as fma_step(bf16) reads it: per 32-column block, its 16 even columns then its 16 odd ones, zero-padded.
inline std::vector<float> split_pairs(const float* x, int64_t K) {
  std::vector<float> out((K + 31) / 32 * 32, 0.f);
  for (int64_t k = 0; k < K; ++k) out[k / 32 * 32 + (k % 2) * 16 + (k % 32) / 2] = x[k];
  return out;
}

// y (N,) = W (N, K) x (K,), rows split over PyTorch's threads; four rows at a time, so that each x load feeds four
// multiply-adds and four independent accumulators hide their latency.
template <typename W>
void gemv_rows(const W* w, const float* x, float* y, int64_t N, int64_t K) {
  std::vector<float> split;
  if constexpr (std::is_same_v<W, at::BFloat16>) {
    split = split_pairs(x, K);
    x = split.data();
  }
  // grain: at least 64 rows per task, so a thread streams a contiguous slab of W
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + 4 <= end; n += 4) {
      // bf16 and int8: prefetch rows n+8 .. n+12 while reading n .. n+4 (within our slab). fp32 rows are twice
      // as long and measured faster without it: the hardware prefetcher keeps up, and extra requests only compete.
      const bool ahead = sizeof(W) < 4 && n + 12 <= end;
      dot_rows<W, 4>(w + n * K, K, x, y + n, reinterpret_cast<const char*>(w + (n + 8) * K),
                     ahead ? 4 * K * sizeof(W) : 0);
    }
    for (; n < end; ++n) dot_rows<W, 1>(w + n * K, K, x, y + n, nullptr, 0);
  });
}

}  // namespace minllama
