// normalize_project: the head of a tower, fp32: gather pooled rows -> LayerNorm -> @ proj (+ bias) -> L2 norm.
//
//   x: pooled rows (B, W), row b at x + b * sxb; or token states (B, L, W) with `index` (B,) int64 in
//   [0, L): row b at x + b * sxb + index[b] * sxl. Unit stride on W.  ln_w, ln_b: (W,).
//   proj: (W, E) with rows of stride sp (unit stride on E), or none (then E == W);  proj_bias: (E,) or
//   none.  out: (B, E) contiguous.  normalize: out[b] /= max(||out[b]||, 1e-12), as F.normalize.
// The B normalised rows go to a scratch buffer; the projection is a small GEMM split over 16-column
// panels of proj on torch's OpenMP threads (each panel is packed contiguously, then used for all B rows).
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {
namespace {

void normalize_project_f32(const float* x, int64_t B, int64_t sxb, int64_t sxl, const int64_t* index,
                           const float* ln_w, const float* ln_b, float eps, int64_t W, const float* proj, int64_t sp,
                           int64_t E, const float* pbias, bool normalize, float* out) {
  thread_local std::vector<float> lnbuf;
  float* ln = proj ? scratch(lnbuf, B * W) : out;  // without a projection the LN rows are the output
  parallel_for(B, std::max<int64_t>(1, 8192 / std::max<int64_t>(W, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = x + b * sxb + (index ? index[b] * sxl : 0);
      layer_norm_row(row, nullptr, nullptr, ln_w, ln_b, ln + b * W, W, eps);
    }
  });
  if (proj) {
    const int64_t panels = ceil_div(E, 16);
    const int64_t grain = std::max<int64_t>(1, ceil_div(panels, 4 * max_threads()));
    parallel_for(panels, grain, [&](int64_t p0, int64_t p1) {
      thread_local std::vector<float> panel_buf;
      float* panel = scratch(panel_buf, 16 * W);
      for (int64_t t = p0; t < p1; ++t) {
        const int64_t n0 = t * 16, nn = std::min<int64_t>(16, E - n0);
        pack_panel(proj + n0, sp, W, nn, panel);
        gemm(B, nn, W, ln, W, panel, 16 * W, 16, out + n0, E, false);
      }
    });
  }
  if (!pbias && !normalize) return;
  for (int64_t b = 0; b < B; ++b) {
    float* y = out + b * E;
    if (pbias)
      for (int64_t e = 0; e < E; ++e) y[e] += pbias[e];
    if (normalize) {
      __m256 acc = _mm256_setzero_ps();
      int64_t e = 0;
      for (; e + 8 <= E; e += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(y + e), _mm256_loadu_ps(y + e), acc);
      float ss = hsum(acc);
      for (; e < E; ++e) ss += y[e] * y[e];
      const float inv = 1.0f / std::max(std::sqrt(ss), 1e-12f);
      for (e = 0; e < E; ++e) y[e] *= inv;
    }
  }
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {

void bind_normalize_project(py::module_& m) {
  m.def(
      "normalize_project",
      [](uintptr_t x, int64_t B, int64_t sxb, int64_t sxl, uintptr_t index, uintptr_t ln_w, uintptr_t ln_b, float eps,
         int64_t W, uintptr_t proj, int64_t sp, int64_t E, uintptr_t pbias, bool normalize, uintptr_t out) {
        py::gil_scoped_release release;
        normalize_project_f32(reinterpret_cast<const float*>(x), B, sxb, sxl, reinterpret_cast<const int64_t*>(index),
                              reinterpret_cast<const float*>(ln_w), reinterpret_cast<const float*>(ln_b), eps, W,
                              reinterpret_cast<const float*>(proj), sp, E, reinterpret_cast<const float*>(pbias),
                              normalize, reinterpret_cast<float*>(out));
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("x"), py::arg("B"), py::arg("sxb"), py::arg("sxl"), py::arg("index"), py::arg("ln_w"), py::arg("ln_b"),
      py::arg("eps"), py::arg("W"), py::arg("proj"), py::arg("sp"), py::arg("E"), py::arg("proj_bias"),
      py::arg("normalize"), py::arg("out"),
      "LayerNorm -> @ proj (+ proj_bias) -> optional L2 normalisation of pooled rows, on fp32 pointers (index: "
      "int64 or 0, proj / proj_bias: 0 for none); strides in elements; out (B, E) contiguous.");
}

}  // namespace fastclip
