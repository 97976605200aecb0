// The bf16 products of the attention kernel (csrc/attention.cpp, bf16_dots): for CPUs with AVX512-BF16,
// S = Q K^T and O += P V on vdpbf16ps, which multiplies pairs of bf16 values and accumulates in fp32 at twice
// the rate of fp32 FMAs. q, k, v and the softmax weights P are rounded to bf16 (round to nearest even) as they
// are packed; the softmax itself, its row sums and O stay fp32. Exact for a bf16 model's q, k, v (already
// bf16 values); for an int8 model's fp32 ones it adds a relative error of about 2^-9 per element.
//
// Layouts, "pair" = two bf16 in one uint32 (the lower-indexed element in the low half):
//   K panels:  Kb[(t * D2 + i) * 16 + c] = (k[16 t + c][2 i], k[16 t + c][2 i + 1]), D2 = ceil(D / 2) pairs,
//              zero past Lk and past D (the pairs run along the head dim: S sums over it);
//   V:         Vb[jp * Dp + d] = (v[2 jp][d], v[2 jp + 1][d]), Dp = round_up(D, 16), zero past Lk and D
//              (the pairs run along the keys: O sums over them);
//   Q and P:   row r of pairs along its length (to_pairs), zero-padded to an even length.
#pragma once


#include "common.h"
#include "gemm512.h"

namespace fastclip {

bool avx512_enabled();  // module.cpp

// AVX512-BF16 (with AVX-512BW/VL) present and AVX-512 not switched off: bf16_dots can run.
inline bool attention_bf16_supported() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has && avx512_enabled();
}

}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

namespace fastclip {
namespace attention_bf16 {

// dst[r * ldd + i] = (src[r][2 i], src[r][2 i + 1]) for rows r < rows (src rows lds apart), i < ceil(n / 2);
// the element past an odd n is 0.
inline void to_pairs(const float* src, int64_t lds, int64_t rows, int64_t n, uint32_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint32_t* d = dst + r * ldd;
    for (int64_t j = 0; j < n; j += 32) {
      const __mmask16 lo = mask16(n - j), hi = mask16(n - j - 16);
      const __m512bh p = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, s + j + 16), _mm512_maskz_loadu_ps(lo, s + j));
      _mm512_mask_storeu_epi32(d + j / 2, mask16(ceil_div(n - j, 2)), reinterpret_cast<const __m512i&>(p));
    }
  }
}

// K (Lk, D) rows skl apart and V (Lk, D) rows svl apart into the layouts of the header; row_pairs: scratch of
// ceil(D / 2) pairs.
inline void pack_kv(const float* k, int64_t skl, const float* v, int64_t svl, int64_t Lk, int64_t D, int64_t Dp,
                    uint32_t* Kb, uint32_t* Vb, uint32_t* row_pairs) {
  const int64_t D2 = ceil_div(D, 2), Lkp = round_up(Lk, 16);
  for (int64_t j = 0; j < Lkp; ++j) {  // each key's pairs, then spread to its lane of the 16-key panel
    uint32_t* dst = Kb + (j / 16) * D2 * 16 + (j % 16);
    if (j < Lk) to_pairs(k + j * skl, 0, 1, D, row_pairs, 0);
    for (int64_t i = 0; i < D2; ++i) dst[i * 16] = j < Lk ? row_pairs[i] : 0u;
  }
  // vpermw index: words 0..15 are row 2 jp's 16 values, 16..31 row 2 jp + 1's; interleave them into pairs
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t jp = 0; jp < ceil_div(Lk, 2); ++jp) {
    const float* v0 = v + 2 * jp * svl;
    const bool odd = 2 * jp + 1 >= Lk;  // the last key of an odd Lk pairs with zeros
    uint32_t* dst = Vb + jp * Dp;
    for (int64_t d = 0; d < Dp; d += 16) {
      const __mmask16 m = mask16(D - d);
      const __m512 a = _mm512_maskz_loadu_ps(m, v0 + d), b = odd ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, v0 + svl + d);
      const __m512bh ab = _mm512_cvtne2ps_pbh(b, a);
      _mm512_storeu_si512(dst + d, _mm512_permutexvar_epi16(interleave, reinterpret_cast<const __m512i&>(ab)));
    }
  }
}

// C[r, 0:16 NV] (+)= sum_i A[r lda + i] . (B0 | B1)[i ldb + 0:16] for r < MR: pairs times pairs, fp32 sums.
template <int MR, int NV>
inline void tile(int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B0, const uint32_t* B1, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  __m512 c[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) c[r][j] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * j) : _mm512_setzero_ps();
  for (int64_t i = 0; i < K2; ++i) {
    const __m512i b0 = _mm512_loadu_si512(B0 + i * ldb);
    const __m512i b1 = NV == 2 ? _mm512_loadu_si512(B1 + i * ldb) : b0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(A[r * lda + i]));
      c[r][0] = _mm512_dpbf16_ps(c[r][0], reinterpret_cast<const __m512bh&>(a), reinterpret_cast<const __m512bh&>(b0));
      if (NV == 2)
        c[r][NV - 1] = _mm512_dpbf16_ps(c[r][NV - 1], reinterpret_cast<const __m512bh&>(a),
                                        reinterpret_cast<const __m512bh&>(b1));
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(C + r * ldc + 16 * j, c[r][j]);
}

// C[M x N] (+)= A[M x K2 pairs] @ B[K2 pairs x N], N a multiple of 16: B in column tiles of 16 (tile t at
// B + t * b_tile, pair rows ldb apart), A rows lda pairs apart, C rows ldc floats apart.
inline void gemm(int64_t M, int64_t N, int64_t K2, const uint32_t* A, int64_t lda, const uint32_t* B,
                 int64_t b_tile, int64_t ldb, float* C, int64_t ldc, bool acc) {
  for (int64_t n0 = 0, t = 0; n0 < N; n0 += 32, t += 2) {
    const bool two = n0 + 16 < N;
    row_tiles(M, 12, [&](int64_t m, int64_t mr) {
      const uint32_t* At = A + m * lda;
      const uint32_t* B0 = B + t * b_tile;
      float* Ct = C + m * ldc + n0;
      switch (mr) {
#define FASTCLIP_TILE(R)                                                                      \
  case R:                                                                                     \
    if (two) tile<R, 2>(K2, At, lda, B0, B0 + b_tile, ldb, Ct, ldc, acc);                     \
    else tile<R, 1>(K2, At, lda, B0, nullptr, ldb, Ct, ldc, acc);                             \
    break;
        FASTCLIP_TILE(12) FASTCLIP_TILE(11) FASTCLIP_TILE(10) FASTCLIP_TILE(9) FASTCLIP_TILE(8) FASTCLIP_TILE(7)
        FASTCLIP_TILE(6) FASTCLIP_TILE(5) FASTCLIP_TILE(4) FASTCLIP_TILE(3) FASTCLIP_TILE(2) FASTCLIP_TILE(1)
#undef FASTCLIP_TILE
        default: break;
      }
    });
  }
}

}  // namespace attention_bf16
}  // namespace fastclip

#pragma GCC pop_options
