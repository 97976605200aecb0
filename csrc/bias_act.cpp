// bias_act: y = act(x + bias), fp32, act in none / gelu (erf) / gelu_tanh / quick_gelu.
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
}

}  // namespace fastclip
