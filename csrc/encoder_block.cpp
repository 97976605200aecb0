// encoder_block: one pre-norm transformer block in a single call, the kernels of layer_norm, linear_int8
// (int8 models) or linear (fp32 models, the packed-panel path) and attention chained with no Python between them:
//
//   s = x + pending                (pending: the previous block's MLP output, or none: s = x)
//   y = LN_1(s);  q, k, v = split(y @ Wqkv^T + bqkv)     (M, 3W), M = B * L tokens
//   s = s + (attention(q, k, v) @ Wo^T + bo);  y = LN_2(s)
//   m = act(y @ Wfc^T + bfc) @ Wproj^T + bproj
//
// and returns (s, m) as two (M, W) buffers: the residual add of m is left to the next block's LN_1, as the
// op-by-op path does. Each step is the same kernel with the same arguments as that path, so the results
// are bit for bit its own. Each int8 layer comes as (packed, w_scale, colsum, bias, x_scale) pointers of
// its pack (fastclip/backends/cpu/linear_int8.py; x_scale 0 for none), each fp32 layer as (packed, panel
// width, bias or 0, 0, 0) (fastclip/backends/cpu/linear.py).
//
//   x, pending, s_out, m_out: (M, W) contiguous fp32; scratch: (M, 2W + max(4W, mlp)) fp32.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>

#include "activation.h"
#include "attention_bf16.h"
#include "ops.h"

namespace py = pybind11;

namespace fastclip {
namespace {

using Layer = std::array<uintptr_t, 5>;  // int8: packed, w_scale, colsum, bias, x_scale; fp32: packed, panel, bias

template <class T>
const T* at(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

struct Linear {
  bool int8;
  void operator()(const Layer& l, const float* x, int64_t sx, float* y, int64_t sy, int64_t M, int64_t N, int64_t K,
                  int act) const {
    if (int8)
      linear_int8(x, sx, at<float>(l[4]), at<int8_t>(l[0]), at<float>(l[1]), at<int32_t>(l[2]), at<float>(l[3]), y, sy,
                  M, N, K, act);
    else
      linear_f32_packed(static_cast<int64_t>(l[1]), x, sx, at<float>(l[0]), at<float>(l[2]), y, sy, M, N, K, act);
  }
};

void encoder_block(Linear run_linear, const float* x, const float* pending, float* s_out, float* m_out,
                   float* scratch, int64_t B, int64_t L, int64_t W, int64_t H, int64_t mlp, const float* ln1_w,
                   const float* ln1_b, float ln1_eps, const float* ln2_w, const float* ln2_b, float ln2_eps,
                   const Layer& qkv, const Layer& out, const Layer& fc, const Layer& proj, int act, bool causal,
                   const int32_t* key_lengths, bool bf16_dots) {
  const int64_t M = B * L, Dh = W / H, wide = std::max(4 * W, mlp);
  float* y = scratch;          // (M, W): LN_1(s), later LN_2(s)
  float* h = y + M * W;        // (M, W): the attention's output projection
  float* big = h + M * W;      // (M, wide): qkv (M, 3W) and the attention output (M, W), later the MLP hidden
  float* qkv_out = big;        // (M, 3W)
  float* att = big + M * 3 * W;  // (M, W) = (B, L, H, Dh)
  const float* s = x;
  if (pending) {
    layer_norm_f32(pending, W, x, W, ln1_w, ln1_b, y, W, s_out, W, M, W, ln1_eps);  // s_out = pending + x
    s = s_out;
  } else {
    layer_norm_f32(x, W, nullptr, 0, ln1_w, ln1_b, y, W, nullptr, 0, M, W, ln1_eps);
  }
  run_linear(qkv, y, W, qkv_out, 3 * W, M, 3 * W, W, 0);
  const Strides sq{L * 3 * W, Dh, 3 * W}, so{L * W, Dh, W};  // (b, h, l) strides of q / k / v and of att
  attention_f32(qkv_out, sq, qkv_out + W, sq, qkv_out + 2 * W, sq, att, so, B, H, L, L, Dh, causal,
                static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh))), key_lengths, nullptr, nullptr, 0,
                bf16_dots);  // the scale as the attention op computes it (in double, rounded once)
  run_linear(out, att, W, h, W, M, W, W, 0);
  layer_norm_f32(h, W, s, W, ln2_w, ln2_b, y, W, s_out, W, M, W, ln2_eps);  // s_out = h + s (in place if s is s_out)
  run_linear(fc, y, W, big, mlp, M, mlp, W, act);
  run_linear(proj, big, mlp, m_out, W, M, W, mlp, 0);
}

}  // namespace

void bind_encoder_block(py::module_& m) {
  m.def(
      "encoder_block",
      [](bool int8, uintptr_t x, uintptr_t pending, uintptr_t s_out, uintptr_t m_out, uintptr_t scratch, int64_t B,
         int64_t L, int64_t W, int64_t H, int64_t mlp, uintptr_t ln1_w, uintptr_t ln1_b, float ln1_eps, uintptr_t ln2_w,
         uintptr_t ln2_b, float ln2_eps, Layer qkv, Layer out, Layer fc, Layer proj, int act, bool causal,
         uintptr_t key_lengths, bool bf16_dots) {
        if (B <= 0 || L <= 0 || H <= 0 || W <= 0 || W % H || mlp <= 0)
          throw std::invalid_argument("encoder_block: need B, L, W, mlp > 0 and W a multiple of H");
        if (act < 0 || act >= kNumActs) throw std::invalid_argument("encoder_block: unknown activation code");
        if (!x || !s_out || !m_out || !scratch || !ln1_w || !ln1_b || !ln2_w || !ln2_b)
          throw std::invalid_argument("encoder_block: null pointer");
        for (const Layer* l : {&qkv, &out, &fc, &proj}) {
          if (!(*l)[0] || (int8 && (!(*l)[1] || !(*l)[2] || !(*l)[3])))
            throw std::invalid_argument("encoder_block: null pointer in a layer's pack");
          if (!int8 && static_cast<int64_t>((*l)[1]) != linear_panel_width())
            throw std::invalid_argument("encoder_block: an fp32 pack's panel width is not linear_panel_width()");
        }
        if (bf16_dots && !attention_bf16_supported())
          throw std::invalid_argument("encoder_block: bf16_dots needs AVX512-BF16");
        py::gil_scoped_release release;
        encoder_block(Linear{int8}, at<float>(x), at<float>(pending), reinterpret_cast<float*>(s_out),
                      reinterpret_cast<float*>(m_out), reinterpret_cast<float*>(scratch), B, L, W, H, mlp,
                      at<float>(ln1_w), at<float>(ln1_b), ln1_eps, at<float>(ln2_w), at<float>(ln2_b), ln2_eps, qkv,
                      out, fc, proj, act, causal, at<int32_t>(key_lengths), bf16_dots);
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("int8"), py::arg("x"), py::arg("pending"), py::arg("s_out"), py::arg("m_out"), py::arg("scratch"),
      py::arg("B"), py::arg("L"), py::arg("W"), py::arg("H"), py::arg("mlp"), py::arg("ln1_w"), py::arg("ln1_b"),
      py::arg("ln1_eps"), py::arg("ln2_w"), py::arg("ln2_b"), py::arg("ln2_eps"), py::arg("qkv"), py::arg("out"),
      py::arg("fc"), py::arg("proj"), py::arg("act"), py::arg("causal"), py::arg("key_lengths") = 0,
      py::arg("bf16_dots") = false,
      "One pre-norm transformer block (csrc/encoder_block.cpp): s_out = x [+ pending] + attention output, "
      "m_out = the MLP output, both (B * L, W) fp32; layers as int8 (packed, w_scale, colsum, bias, x_scale) or "
      "fp32 (packed, panel, bias, 0, 0) pointers; scratch (B * L, 2W + max(4W, mlp)) fp32.");
}

}  // namespace fastclip
