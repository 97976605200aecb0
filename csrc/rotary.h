// The rotation of one token's q or k row by its rotary angles (interleaved pairs), shared by the rotary op
// (csrc/rotary.cpp) and the attention kernel's fused rotary loads (csrc/attention.cpp).
#pragma once

#include "common.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {

// xr (D) -> yr (D): pair i = channels (2i, 2i+1) rotated by the angle with cosine cr[i] and sine sr[i]:
// (x0 c - x1 s, x1 c + x0 s). 8 channels (4 pairs) per step: x * c' + swap(x) * s' with c' = (c0, c0, c1, c1,
// ...) and s' = (-s0, s0, -s1, s1, ...), the reference op's products and sums. D even.
inline void rotate_row(const float* xr, float* yr, const float* cr, const float* sr, int64_t D) {
  const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256 sign = _mm256_setr_ps(-0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_loadu_ps(xr + d);
    const __m256 c = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cr + d / 2)), dup);
    const __m256 s = _mm256_xor_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sr + d / 2)), dup), sign);
    const __m256 swapped = _mm256_permute_ps(x, 0xB1);  // (x1, x0, x3, x2, ...)
    _mm256_storeu_ps(yr + d, _mm256_add_ps(_mm256_mul_ps(x, c), _mm256_mul_ps(swapped, s)));
  }
  for (; d < D; d += 2) {
    const float x0 = xr[d], x1 = xr[d + 1], c = cr[d / 2], s = sr[d / 2];
    yr[d] = x0 * c - x1 * s;
    yr[d + 1] = x1 * c + x0 * s;
  }
}

}  // namespace fastclip

#pragma GCC pop_options
