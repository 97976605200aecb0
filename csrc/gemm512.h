// The small GEMM of common.h (gemm) for CPUs with AVX-512F: the same operands and layout -- B in
// column tiles of 16 -- with 16-wide zmm vectors and row tiles of up to 12, two column tiles (32
// columns) per FMA tile. Used by the attention kernel when the CPU has AVX-512F (avx512_enabled()).
#pragma once

#include "common.h"

namespace fastclip {

// AVX-512F present (avx512_present) and not switched off (tests switch it off to run the AVX2 path on
// AVX-512 CPUs).
bool avx512_enabled();

}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

namespace fastclip {

// Lanes [0, n) set, n clamped to [0, 16].
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// C[r, 0:16 NV] (+)= sum_k A[r lda + k] * (B0 | B1)[k ldb + 0:16] for r < MR; B0/B1: two column tiles,
// read and written only in the lanes of m0 / m1.
template <int MR, int NV>
inline void gemm512_tile(int64_t K, const float* A, int64_t lda, const float* B0, const float* B1, int64_t ldb,
                         float* C, int64_t ldc, bool accumulate, __mmask16 m0, __mmask16 m1) {
  __m512 c[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c[r][0] = accumulate ? _mm512_maskz_loadu_ps(m0, C + r * ldc) : _mm512_setzero_ps();
    if (NV == 2) c[r][NV - 1] = accumulate ? _mm512_maskz_loadu_ps(m1, C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, B0 + k * ldb);
    const __m512 b1 = NV == 2 ? _mm512_maskz_loadu_ps(m1, B1 + k * ldb) : b0;
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      if (NV == 2) c[r][NV - 1] = _mm512_fmadd_ps(a, b1, c[r][NV - 1]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(C + r * ldc, m0, c[r][0]);
    if (NV == 2) _mm512_mask_storeu_ps(C + r * ldc + 16, m1, c[r][NV - 1]);
  }
}

// M rows in row tiles of at most 12 (row_tiles).
template <int NV>
inline void gemm512_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* B0, const float* B1,
                         int64_t ldb, float* C, int64_t ldc, bool acc, __mmask16 m0, __mmask16 m1) {
  row_tiles(M, 12, [&](int64_t m, int64_t mr) {
    const float* At = A + m * lda;
    float* Ct = C + m * ldc;
    switch (mr) {
#define FASTCLIP_TILE512(R) \
  case R: gemm512_tile<R, NV>(K, At, lda, B0, B1, ldb, Ct, ldc, acc, m0, m1); break;
      FASTCLIP_TILE512(12) FASTCLIP_TILE512(11) FASTCLIP_TILE512(10) FASTCLIP_TILE512(9) FASTCLIP_TILE512(8)
      FASTCLIP_TILE512(7) FASTCLIP_TILE512(6) FASTCLIP_TILE512(5) FASTCLIP_TILE512(4) FASTCLIP_TILE512(3)
      FASTCLIP_TILE512(2) FASTCLIP_TILE512(1)
#undef FASTCLIP_TILE512
      default: break;
    }
  });
}

// gemm() of common.h with zmm tiles: C[M x N] (+)= A[M x K] @ B[K x N], B in column tiles of 16 (tile t
// at B + t * b_tile, rows ldb apart), A and C rows of stride lda / ldc.
inline void gemm512(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t b_tile,
                    int64_t ldb, float* C, int64_t ldc, bool acc) {
  int64_t n0 = 0, t = 0;
  for (; n0 + 16 < N; n0 += 32, t += 2)  // two column tiles (the second may be partial)
    gemm512_rows<2>(M, K, A, lda, B + t * b_tile, B + (t + 1) * b_tile, ldb, C + n0, ldc, acc, mask16(16),
                    mask16(N - n0 - 16));
  if (n0 < N) gemm512_rows<1>(M, K, A, lda, B + t * b_tile, nullptr, ldb, C + n0, ldc, acc, mask16(N - n0), 0);
}

}  // namespace fastclip

#pragma GCC pop_options
