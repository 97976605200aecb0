// The activations of bias_act and of the linear kernel's epilogue, on 8 floats (AVX2/FMA), so a fused
// linear + activation computes exactly what linear followed by bias_act computes.
#pragma once

#include "common.h"

namespace fastclip {

enum Act { kNone = 0, kGelu = 1, kGeluTanh = 2, kQuickGelu = 3 };

// The name of each Act code, in code order. Python reads them through _C.activation_codes() (the names
// are fastclip.ref's), so the codes are declared here only.
inline constexpr const char* kActNames[] = {"none", "gelu", "gelu_tanh", "quick_gelu"};
inline constexpr int kNumActs = sizeof(kActNames) / sizeof(kActNames[0]);
static_assert(kNumActs == kQuickGelu + 1, "kActNames must name every Act code");

}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {

template <int ACT>
inline __m256 activate(__m256 x) {
  if (ACT == kGelu) {  // 0.5 x (1 + erf(x / sqrt(2)))
    const __m256 e = erf_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(e, _mm256_set1_ps(1.0f)));
  }
  if (ACT == kGeluTanh) {  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(tanh_ps(u), _mm256_set1_ps(1.0f)));
  }
  if (ACT == kQuickGelu) {  // x * sigmoid(1.702 x)
    const __m256 e = exp_ps(_mm256_mul_ps(_mm256_set1_ps(-1.702f), x));
    return _mm256_mul_ps(x, _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
  }
  return x;
}

}  // namespace fastclip

#pragma GCC pop_options
