// layer_norm: LayerNorm over the last dim, fp32, with an optional fused residual add.
//
//   x: (R, D) rows of stride sx (unit stride on D); residual: (R, D) rows of stride sr or none;
//   weight, bias: (D,). Without a residual: y = LN(x). With one: s = x + residual is written to s_out
//   (R, D, row stride ss) and y = LN(s) -- a pre-norm block keeps its residual stream. y: row stride sy.
// Rows are split over torch's OpenMP threads; each row is three AVX2 passes (sum, centred sum of
// squares, normalise), the same two-pass statistics as the reference.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {

// Declared in csrc/ops.h (the fused encoder block calls it).
void layer_norm_f32(const float* x, int64_t sx, const float* r, int64_t sr, const float* w, const float* b, float* y,
                    int64_t sy, float* s, int64_t ss, int64_t rows, int64_t D, float eps) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  parallel_for(rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      layer_norm_row(x + i * sx, r ? r + i * sr : nullptr, s ? s + i * ss : nullptr, w, b, y + i * sy, D, eps);
  });
}

}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {

void bind_layer_norm(py::module_& m) {
  m.def(
      "layer_norm",
      [](uintptr_t x, int64_t sx, uintptr_t res, int64_t sr, uintptr_t w, uintptr_t b, uintptr_t y, int64_t sy,
         uintptr_t s, int64_t ss, int64_t rows, int64_t D, float eps) {
        py::gil_scoped_release release;
        layer_norm_f32(reinterpret_cast<const float*>(x), sx, reinterpret_cast<const float*>(res), sr,
                       reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(b), reinterpret_cast<float*>(y),
                       sy, reinterpret_cast<float*>(s), ss, rows, D, eps);
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("x"), py::arg("sx"), py::arg("residual"), py::arg("sr"), py::arg("weight"), py::arg("bias"),
      py::arg("y"), py::arg("sy"), py::arg("s_out"), py::arg("ss"), py::arg("rows"), py::arg("D"), py::arg("eps"),
      "y = LayerNorm(x [+ residual]) on fp32 pointers, row strides in elements; with a residual (0: none), "
      "s_out receives x + residual.");
}

}  // namespace fastclip
