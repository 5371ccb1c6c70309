// y = W x for one token when W is stored in blocks of 32 weights: GGUF's Q4_0, Q4_1 and Q8_0 (llama.cpp's files)
// and minllama-quant's int4 (a scale and a min per group of 32, 64, ... weights).
//
// Each of them is, for block b of a row, w = d * q + m: q the block's 32 integer codes, d and m two fp16 numbers
// (stored in the block for GGUF, in arrays of their own for int4; Q4_0 has m = -8 d, Q8_0 m = 0). So a row's dot
// product with x is
//
//     sum over blocks b of   d_b * (q_b . x_b)  +  m_b * sum(x_b)
//
// The codes are widened to fp32 exactly and multiplied with x in fp32 (the arithmetic of the dequantized matrix,
// without ever writing it out); d is applied once per block, and the sums of x are computed once per call for all
// rows. A 4-bit block is 16 bytes: byte j holds code j in its low nibble and code j+16 in its high one (GGUF's
// order), so the low nibbles meet x[0..16) and the high ones x[16..32). int4 packs code 2j low and 2j+1 high; the
// same loop reads it with x's columns rearranged per block to match (split_pairs, as for bf16).
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

namespace minllama {

// Where the codes, scales and offsets of each block are, in bytes. A group is `blocks_per_group` blocks sharing
// one d and m (1 for GGUF; 2 for int4 with groups of 64).
struct BlockMatrix {
  int64_t N = 0, K_padded = 0;  // rows; columns rounded up to whole groups (int4 pads the last group with zeros)
  const uint8_t* codes = nullptr;  // block b of row n at codes + n * codes_row + b * codes_block
  int64_t codes_row = 0, codes_block = 0;
  const uint8_t* d = nullptr;  // group g of row n: its fp16 scale at d + n * d_row + g * d_group
  int64_t d_row = 0, d_group = 0;
  const uint8_t* m = nullptr;  // its fp16 offset, the same way; nullptr: m = m_per_d * d
  int64_t m_row = 0, m_group = 0;
  float m_per_d = 0.f;
  int64_t blocks_per_group = 1;
  bool bytes = false;        // 8-bit signed codes (Q8_0: 32 bytes a block); otherwise 16 bytes of 4-bit codes
  bool interleaved = false;  // int4's nibble order (see the top)
  bool scales_apart = false;  // int4: d and m in fp16 arrays of their own (GGUF: at the start of each block)
};

inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

inline float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);  // unaligned in GGUF blocks of 18 or 34 bytes
  return _cvtsh_ss(h);
}

// acc += q . x over one block of 32 codes at c; x0, x1: the x values of codes 0..15 and 16..31.
template <bool kBytes>
inline __m512 block_dot(const uint8_t* c, __m512 x0, __m512 x1, __m512 acc) {
  if constexpr (kBytes) {
    const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(c)));
    const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(c + 16)));
    return _mm512_fmadd_ps(q1, x1, _mm512_fmadd_ps(q0, x0, acc));
  } else {
    const __m512i wide = _mm512_cvtepu8_epi32(load16(c));  // 16 bytes
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(wide, _mm512_set1_epi32(15)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(wide, 4));
    return _mm512_fmadd_ps(hi, x1, _mm512_fmadd_ps(lo, x0, acc));
  }
}

// y[0 .. ROWS) for ROWS consecutive rows from row n; group_sums[g] = the sum of x over group g's columns.
template <bool kBytes, int ROWS>
inline void block_rows(const BlockMatrix& W, int64_t n, const float* x, const float* group_sums, float* y) {
  __m512 acc[ROWS];
  float offset[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps(), offset[r] = 0.f;
  const int64_t groups = W.K_padded / 32 / W.blocks_per_group;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dots[ROWS];  // q . x of this group, per row, still in 16 lanes
    for (int r = 0; r < ROWS; ++r) dots[r] = _mm512_setzero_ps();
    for (int64_t b = g * W.blocks_per_group; b < (g + 1) * W.blocks_per_group; ++b) {
      const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
      for (int r = 0; r < ROWS; ++r)
        dots[r] = block_dot<kBytes>(W.codes + (n + r) * W.codes_row + b * W.codes_block, x0, x1, dots[r]);
    }
    for (int r = 0; r < ROWS; ++r) {
      const float d = fp16_at(W.d + (n + r) * W.d_row + g * W.d_group);
      const float m = W.m ? fp16_at(W.m + (n + r) * W.m_row + g * W.m_group) : W.m_per_d * d;
      acc[r] = _mm512_fmadd_ps(dots[r], _mm512_set1_ps(d), acc[r]);
      offset[r] += m * group_sums[g];
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r] = _mm512_reduce_add_ps(acc[r]) + offset[r];
}

template <bool kBytes>
void block_rows_parallel(const BlockMatrix& W, const float* x, const float* group_sums, float* y) {
  at::parallel_for(0, W.N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + 4 <= end; n += 4) block_rows<kBytes, 4>(W, n, x, group_sums, y + n);
    for (; n < end; ++n) block_rows<kBytes, 1>(W, n, x, group_sums, y + n);
  });
}

// ---------------------------------------------------------------------------------------- with integer dot products
// Reading the codes is cheap (a 4-bit weight is half a byte); widening each one to fp32 is what costs: ~8
// instructions per 32 weights and row above. llama.cpp's way instead: round x to int8 once per call, one scale per
// block of 32 (x ~ sx * xq, |xq| <= 127, the error at most sx / 2 per number), and multiply codes by xq as integers
// with AVX512-VNNI's vpdpbusd (64 byte products summed four by four into 16 int32 lanes, one instruction). Then
//
//     q_b . x_b  ~  sx_b * (q_b . xq_b)        exact integers, scaled once per block
//
// 4-bit codes go four blocks at a time: one 64-byte register holds the 4 x 16 code bytes, its low nibbles meet one
// register of xq and its high nibbles another, so xq is stored per four blocks as [the low-nibble x of b0, b1, b2,
// b3 (16 each)], then [their high-nibble x], and int32 lanes 4i..4i+3 belong to block i. Q8_0 goes two blocks at a
// time, [b0's 32 codes, b1's 32], lanes 0-7 for b0 and 8-15 for b1. vpdpbusd multiplies unsigned by signed bytes:
// Q8_0's signed codes are read as q + 128 (one xor), and 128 * d_b * sx_b * sum(xq_b) is taken off again.

// Blocks per step: four 4-bit blocks, or two Q8_0 blocks, fill a 64-byte register.
constexpr int64_t step_blocks(bool bytes) { return bytes ? 2 : 4; }

// x rounded to int8 per block, in the step order above, and the per-block numbers every row shares.
struct QuantizedX {
  std::vector<int8_t> q;     // 32 bytes per block, blocks rounded up to whole steps
  std::vector<float> scale;  // sx_b (rounded up to 16 blocks, zeros past the end)
  std::vector<float> sum;    // the exact sum of x over block b (it meets the offsets m_b); Q8_0: sx_b * sum(xq_b)
  bool interleaved = false, bytes = false;
  int64_t K_padded = -1;
};

// x (K_padded floats, zero past K) rounded for matrices laid out like W.
inline QuantizedX quantize_x(const BlockMatrix& W, const float* x) {
  const int64_t blocks = W.K_padded / 32, step = step_blocks(W.bytes);
  QuantizedX out{std::vector<int8_t>((blocks + step - 1) / step * step * 32, 0),
                 std::vector<float>((blocks + 15) / 16 * 16, 0.f), std::vector<float>((blocks + 15) / 16 * 16, 0.f),
                 W.interleaved, W.bytes, W.K_padded};
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);  // codes 0..15 and 16..31
    if (W.interleaved) {  // int4: code c < 16 is column 2c, code 16 + c is column 2c + 1
      const __m512 a = lo;
      lo = _mm512_permutex2var_ps(a, even, hi), hi = _mm512_permutex2var_ps(a, odd, hi);
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    // round half to even (the default rounding mode), as torch.round; |x * inv| <= 127, so int8 holds it
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    int8_t* at = out.q.data() + (W.bytes ? 32 * b : 128 * (b / 4) + 16 * (b % 4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(at + (W.bytes ? 16 : 64)), _mm512_cvtepi32_epi8(qhi));
    out.scale[b] = amax / 127.f;
    out.sum[b] = W.bytes ? out.scale[b] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)))
                         : _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
  }
  return out;
}

// The 64 code bytes of one step from the first of its blocks at c (`count` of them; the rest read as zero codes).
// 4-bit: returns the low nibbles, `high` gets the high ones.
template <bool kBytes>
inline __m512i step_codes(const uint8_t* c, int64_t stride, int64_t count, __m512i& high) {
  if constexpr (kBytes) {  // 32 signed codes each, + 128 (xor the sign bit): unsigned for vpdpbusd
    const __m256i c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c));
    const __m256i c1 = count > 1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + stride))
                                 : _mm256_set1_epi8(-128);  // no second block: codes of 0 once xor-ed
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1), _mm512_set1_epi8(-128));
  } else {  // 16 bytes of nibbles each
    __m512i v;
    if (stride == 16 && count == 4) {
      v = _mm512_loadu_si512(c);  // int4: the four blocks are contiguous
    } else {  // GGUF: each block's codes follow its d (and m)
      v = _mm512_zextsi128_si512(load16(c));  // blocks past count: zero codes
      if (count > 1) v = _mm512_inserti32x4(v, load16(c + stride), 1);
      if (count > 2) v = _mm512_inserti32x4(v, load16(c + 2 * stride), 2);
      if (count > 3) v = _mm512_inserti32x4(v, load16(c + 3 * stride), 3);
    }
    const __m512i nibble = _mm512_set1_epi8(15);
    high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    return _mm512_and_si512(v, nibble);
  }
}

// d (and m) of blocks first .. first+count of row n, as 16 fp32 lanes (the lanes past count are 0).
inline void block_numbers(const BlockMatrix& W, int64_t n, int64_t first, int64_t count, __m512& d, __m512& m) {
  const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
  if (W.scales_apart) {  // int4: fp16 arrays, one number per group of blocks_per_group blocks (d_group = 2)
    const int64_t per = W.blocks_per_group, g0 = first / per, groups = (count + per - 1) / per;
    const __mmask16 valid_groups = static_cast<__mmask16>((1u << groups) - 1);
    const __m512i to_block = _mm512_srli_epi32(  // lane i reads group i / per (per is 1, 2, 4, 8 or 16)
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), __builtin_ctzll(per));
    auto load = [&](const uint8_t* base, int64_t row) {
      const __m512 g = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid_groups, base + n * row + 2 * g0));
      return _mm512_maskz_permutexvar_ps(valid, to_block, g);
    };
    d = load(W.d, W.d_row);
    m = load(W.m, W.m_row);
    return;
  }
  // GGUF: d (and Q4_1's m) at the start of each block: one gather of 16 dwords, d in the low half, m in the high
  const __m512i offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(W.d_group)));
  const __m512i dm = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, offsets,
                                                 W.d + n * W.d_row + first * W.d_group, 1);
  d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm));
  m = W.m ? _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(dm, 16)))
          : _mm512_mul_ps(d, _mm512_set1_ps(W.m_per_d));
}

template <bool kBytes, int ROWS>
inline void block_rows_vnni(const BlockMatrix& W, int64_t n, const QuantizedX& X, float* y) {
  constexpr int64_t S = step_blocks(kBytes);
  const int64_t blocks = W.K_padded / 32;
  // lane -> its block within the step, for spreading 16 per-block scales over a step's lanes
  const __m512i step_lanes = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               kBytes ? 3 : 2);
  __m512 acc[ROWS], offsets[ROWS];
  for (int r = 0; r < ROWS; ++r) acc[r] = offsets[r] = _mm512_setzero_ps();
  for (int64_t first = 0; first < blocks; first += 16) {  // 16 blocks (512 columns) at a time
    const int64_t count = std::min<int64_t>(16, blocks - first);
    const __m512 sx = _mm512_loadu_ps(X.scale.data() + first), sums = _mm512_loadu_ps(X.sum.data() + first);
    __m512 scale[ROWS];  // d_b * sx_b per block
    for (int r = 0; r < ROWS; ++r) {
      __m512 d, m;
      block_numbers(W, n + r, first, count, d, m);
      if constexpr (kBytes) m = _mm512_mul_ps(d, _mm512_set1_ps(-128.f));  // takes the xor's + 128 off again
      scale[r] = _mm512_mul_ps(d, sx);
      offsets[r] = _mm512_fmadd_ps(m, sums, offsets[r]);
    }
    for (int64_t i = 0; i < count; i += S) {
      const int64_t b = first + i;
      const __m512i x0 = _mm512_loadu_si512(X.q.data() + 32 * b);
      const __m512i x1 = kBytes ? x0 : _mm512_loadu_si512(X.q.data() + 32 * b + 64);
      const __m512i lanes = _mm512_add_epi32(step_lanes, _mm512_set1_epi32(static_cast<int>(i)));
      for (int r = 0; r < ROWS; ++r) {
        __m512i high;
        const __m512i low = step_codes<kBytes>(W.codes + (n + r) * W.codes_row + b * W.codes_block, W.codes_block,
                                               std::min<int64_t>(S, count - i), high);
        __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, x0);
        if constexpr (!kBytes) dots = _mm512_dpbusd_epi32(dots, high, x1);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_permutexvar_ps(lanes, scale[r]), acc[r]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], offsets[r]));
}

template <bool kBytes>
void block_rows_vnni_parallel(const BlockMatrix& W, const QuantizedX& X, float* y) {
  at::parallel_for(0, W.N, 64, [&](int64_t begin, int64_t end) {
    int64_t n = begin;
    for (; n + 4 <= end; n += 4) block_rows_vnni<kBytes, 4>(W, n, X, y + n);
    for (; n < end; ++n) block_rows_vnni<kBytes, 1>(W, n, X, y + n);
  });
}

// Which way gemv_blocks multiplies: with integer dot products where the CPU has AVX512-VNNI (the default), or in
// fp32 (exact on x; slower). Switchable for tests and benchmarks (cpu_kernels.cpp's set_integer_dot).
inline bool& integer_dot() {
  static bool on = __builtin_cpu_supports("avx512vnni");
  return on;
}

// One input vector x (K,) and what the block kernels make of it, made once for all the matrices that multiply it
// (q, k and v share theirs; w1 and w3 too).
class BlockInput {
 public:
  BlockInput(const float* x, int64_t K) : x_(x), K_(K) {}
  const float* data() const { return x_; }

  // y (N,) = W x
  void multiply(const BlockMatrix& W, float* y) {
    const float* x = padded(W.K_padded);
    if (integer_dot() && (W.blocks_per_group & (W.blocks_per_group - 1)) == 0 && W.blocks_per_group <= 16) {
      if (q_.K_padded != W.K_padded || q_.interleaved != W.interleaved || q_.bytes != W.bytes) q_ = quantize_x(W, x);
      if (W.bytes)
        block_rows_vnni_parallel<true>(W, q_, y);
      else
        block_rows_vnni_parallel<false>(W, q_, y);
      return;
    }
    const int64_t group_cols = 32 * W.blocks_per_group;
    std::vector<float> group_sums(W.K_padded / group_cols, 0.f);
    for (int64_t k = 0; k < K_; ++k) group_sums[k / group_cols] += x[k];
    std::vector<float> split;
    if (W.interleaved) split = split_pairs(x, W.K_padded), x = split.data();
    if (W.bytes)
      block_rows_parallel<true>(W, x, group_sums.data(), y);
    else
      block_rows_parallel<false>(W, x, group_sums.data(), y);
  }

 private:
  const float* padded(int64_t K_padded) {  // x with zeros up to K_padded (the kernels read whole blocks)
    if (K_padded == K_) return x_;
    if (static_cast<int64_t>(padded_.size()) != K_padded) {
      padded_.assign(K_padded, 0.f);
      std::copy(x_, x_ + K_, padded_.begin());
    }
    return padded_.data();
  }

  const float* x_;
  int64_t K_;
  std::vector<float> padded_;
  QuantizedX q_;
};

}  // namespace minllama
