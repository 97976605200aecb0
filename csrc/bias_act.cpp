// bias_act: y = act(x + bias), fp32, act in none / gelu (erf) / gelu_tanh / quick_gelu; and the gated
// activations (bias_act_gated): y = silu(g + bias_g) * (u + bias_u) for SwiGLU rows [g; u].
//
//   x: (R, N) rows of stride sx (unit stride on N); bias: (N,) or none; y: (R, N) rows of stride sy.
//   y may be x itself (each element is read before it is written), so the op can run in place.
// Rows are split over torch's OpenMP threads; one AVX2 pass per row, the activation chosen at compile
// time (one instantiation per activation).
#include <pybind11/pybind11.h>

#include <stdexcept>

#include "activation.h"
#include "common.h"

namespace py = pybind11;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {
namespace {

template <int ACT>
void bias_act_rows(const float* x, int64_t sx, const float* bias, float* y, int64_t sy, int64_t r0, int64_t r1,
                   int64_t N) {
  const int64_t Nv = N & ~int64_t(7);
  const __m256i tm = tail_mask(N - Nv);
  for (int64_t i = r0; i < r1; ++i) {
    const float* xr = x + i * sx;
    float* yr = y + i * sy;
    int64_t n = 0;
    if (bias) {
      for (; n < Nv; n += 8) _mm256_storeu_ps(yr + n, activate<ACT>(_mm256_add_ps(_mm256_loadu_ps(xr + n), _mm256_loadu_ps(bias + n))));
      if (n < N)
        _mm256_maskstore_ps(yr + n, tm, activate<ACT>(_mm256_add_ps(_mm256_maskload_ps(xr + n, tm), _mm256_maskload_ps(bias + n, tm))));
    } else {
      for (; n < Nv; n += 8) _mm256_storeu_ps(yr + n, activate<ACT>(_mm256_loadu_ps(xr + n)));
      if (n < N) _mm256_maskstore_ps(yr + n, tm, activate<ACT>(_mm256_maskload_ps(xr + n, tm)));
    }
  }
}

template <int ACT>
void bias_act_f32(const float* x, int64_t sx, const float* bias, float* y, int64_t sy, int64_t rows, int64_t N) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) { bias_act_rows<ACT>(x, sx, bias, y, sy, r0, r1, N); });
}

// SwiGLU: x (R, 2N) rows [gate (N); value (N)], bias (2N,) or none -> y (R, N) = silu(gate) * value.
void bias_swiglu_rows(const float* x, int64_t sx, const float* bias, float* y, int64_t sy, int64_t r0, int64_t r1,
                      int64_t N) {
  const int64_t Nv = N & ~int64_t(7);
  const __m256i tm = tail_mask(N - Nv);
  const __m256 one = _mm256_set1_ps(1.0f), neg = _mm256_set1_ps(-0.0f);
  const auto swiglu = [&](__m256 g, __m256 u) {  // g / (1 + exp(-g)) * u
    const __m256 e = exp_ps(_mm256_xor_ps(g, neg));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
  };
  for (int64_t i = r0; i < r1; ++i) {
    const float* gr = x + i * sx;
    const float* ur = gr + N;
    float* yr = y + i * sy;
    int64_t n = 0;
    for (; n < Nv; n += 8) {
      __m256 g = _mm256_loadu_ps(gr + n), u = _mm256_loadu_ps(ur + n);
      if (bias) g = _mm256_add_ps(g, _mm256_loadu_ps(bias + n)), u = _mm256_add_ps(u, _mm256_loadu_ps(bias + N + n));
      _mm256_storeu_ps(yr + n, swiglu(g, u));
    }
    if (n < N) {
      __m256 g = _mm256_maskload_ps(gr + n, tm), u = _mm256_maskload_ps(ur + n, tm);
      if (bias)
        g = _mm256_add_ps(g, _mm256_maskload_ps(bias + n, tm)), u = _mm256_add_ps(u, _mm256_maskload_ps(bias + N + n, tm));
      _mm256_maskstore_ps(yr + n, tm, swiglu(g, u));
    }
  }
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {

void bind_bias_act(py::module_& m) {
  m.def(
      "bias_act",
      [](uintptr_t x, int64_t sx, uintptr_t bias, uintptr_t y, int64_t sy, int64_t rows, int64_t N, int act) {
        if (act < 0 || act >= kNumActs) throw std::invalid_argument("bias_act: unknown activation code");
        const auto* xp = reinterpret_cast<const float*>(x);
        const auto* bp = reinterpret_cast<const float*>(bias);
        auto* yp = reinterpret_cast<float*>(y);
        py::gil_scoped_release release;
        switch (act) {
          case kNone: bias_act_f32<kNone>(xp, sx, bp, yp, sy, rows, N); break;
          case kGelu: bias_act_f32<kGelu>(xp, sx, bp, yp, sy, rows, N); break;
          case kGeluTanh: bias_act_f32<kGeluTanh>(xp, sx, bp, yp, sy, rows, N); break;
          default: bias_act_f32<kQuickGelu>(xp, sx, bp, yp, sy, rows, N); break;
        }
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("x"), py::arg("sx"), py::arg("bias"), py::arg("y"), py::arg("sy"), py::arg("rows"), py::arg("N"),
      py::arg("act"),
      "y = act(x + bias) on fp32 pointers (bias 0: none), row strides in elements; act: a code of "
      "activation_codes(); y may equal x (in place).");
  m.def("gated_activation_codes", [] {
    py::dict codes;
    codes["swiglu"] = 0;
    return codes;
  }, "{gated activation name: code} of the gated activations bias_act_gated implements.");
  m.def(
      "bias_act_gated",
      [](uintptr_t x, int64_t sx, uintptr_t bias, uintptr_t y, int64_t sy, int64_t rows, int64_t N, int act) {
        if (act != 0) throw std::invalid_argument("bias_act_gated: unknown gated activation code");
        const auto* xp = reinterpret_cast<const float*>(x);
        const auto* bp = reinterpret_cast<const float*>(bias);
        auto* yp = reinterpret_cast<float*>(y);
        py::gil_scoped_release release;
        const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(2 * N, 1));
        parallel_for(rows, grain, [&](int64_t r0, int64_t r1) { bias_swiglu_rows(xp, sx, bp, yp, sy, r0, r1, N); });
      },
      py::kw_only(),
      py::arg("x"), py::arg("sx"), py::arg("bias"), py::arg("y"), py::arg("sy"), py::arg("rows"), py::arg("N"),
      py::arg("act"),
      "y (rows, N) = act(x[:, :N] + bias[:N]) * (x[:, N:] + bias[N:]) on fp32 pointers, x (rows, 2N) (bias 0: "
      "none); act: a code of gated_activation_codes(). y must not overlap x.");
}

}  // namespace fastclip
