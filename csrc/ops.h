// The op kernels one C++ caller can chain without returning to Python (csrc/encoder_block.cpp). Each is
// defined in its op's file, which documents its arguments; none takes the GIL, so callers release it.
#pragma once

#include <cstdint>

#include "common.h"

namespace fastclip {

// csrc/layer_norm.cpp. x, residual: (rows, D) rows sx / sr apart (residual may be null); y = LN(x [+ residual])
// rows sy apart; with a residual, s receives x + residual (rows ss apart; may alias residual).
void layer_norm_f32(const float* x, int64_t sx, const float* r, int64_t sr, const float* w, const float* b, float* y,
                    int64_t sy, float* s, int64_t ss, int64_t rows, int64_t D, float eps);

// csrc/linear_int8.cpp. y (M, N) rows sy apart = act(dequantised int8 GEMM of x (M, K) rows sx apart, scaled
// per channel by xs (K,) or null, with the packed weight (packed, ws, cs, bias padded to 16 * ceil(N / 16))).
void linear_int8(const float* x, int64_t sx, const float* xs, const int8_t* packed, const float* ws, const int32_t* cs,
                 const float* bias, float* y, int64_t sy, int64_t M, int64_t N, int64_t K, int act);

// csrc/linear.cpp. y (M, N) rows sy apart = act(x (M, K) rows sx apart @ W^T + bias (N,) or null), W packed
// in panels of `panel` columns for the path that runs now (linear_panel_width()).
void linear_f32_packed(int64_t panel, const float* x, int64_t sx, const float* packed, const float* bias, float* y,
                       int64_t sy, int64_t M, int64_t N, int64_t K, int act);
int64_t linear_panel_width();  // 32 (AVX-512 path), 16 (AVX2 + FMA) or 0

// csrc/attention.cpp. softmax(q k^T * scale [+ causal mask]) v: q (B, H, Lq, D), k / v (B, H, Lk, D), out
// (B, H, Lq, D), strides (b, h, l) in elements, unit stride on D; key_lengths (B,) or null; rope_* null for none.
void attention_f32(const float* q, Strides sq, const float* k, Strides sk, const float* v, Strides sv, float* out,
                   Strides so, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, bool causal, float scale,
                   const int32_t* key_lengths, const float* rope_cos, const float* rope_sin, int64_t rope_start,
                   bool bf16_dots);

}  // namespace fastclip
