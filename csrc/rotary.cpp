// rotary: rotary position embedding of q or k in the interleaved pair layout, fp32.
//
//   x: (B, H, L, D) with any element strides for B, H, L and unit stride on D (a view of a packed
//   (B, L, 3, H, D) qkv projection); out: (B, H, L, D) likewise (may not overlap x); cos / sin:
//   (L - start, D / 2) contiguous, the angle of each (token, pair). Pair i of token l >= start is the
//   channels (2i, 2i+1): out = (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin); tokens l < start
//   (the class token) are copied. D even.
// One pass: rows (b, l, h) are split over torch's OpenMP threads, each rotated by rotate_row (csrc/rotary.h).
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>

#include "common.h"
#include "rotary.h"

namespace py = pybind11;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {
namespace {

void rotary_f32(const float* x, Strides sx, float* out, Strides so, const float* cos, const float* sin, int64_t B,
                int64_t H, int64_t L, int64_t D, int64_t start) {
  const int64_t half = D / 2;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  parallel_for(B * H * L, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % H, bl = r / H, b = bl / L, l = bl % L;  // heads innermost: a token's rows are adjacent
      const float* xr = x + b * sx.b + h * sx.h + l * sx.l;
      float* yr = out + b * so.b + h * so.h + l * so.l;
      if (l < start) std::memcpy(yr, xr, D * sizeof(float));
      else rotate_row(xr, yr, cos + (l - start) * half, sin + (l - start) * half, D);
    }
  });
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {

void bind_rotary(py::module_& m) {
  m.def(
      "rotary",
      [](uintptr_t x, py::tuple sx, uintptr_t out, py::tuple so, uintptr_t cos, uintptr_t sin, int64_t B, int64_t H,
         int64_t L, int64_t D, int64_t start) {
        if (D % 2 || start < 0 || start > L) throw std::invalid_argument("rotary: needs an even D and 0 <= start <= L");
        auto st = [](py::tuple t) { return Strides{t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>()}; };
        const Strides a = st(sx), b = st(so);
        py::gil_scoped_release release;
        rotary_f32(reinterpret_cast<const float*>(x), a, reinterpret_cast<float*>(out), b,
                   reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(sin), B, H, L, D, start);
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("x"), py::arg("x_strides"), py::arg("out"), py::arg("out_strides"), py::arg("cos"), py::arg("sin"),
      py::arg("B"), py::arg("H"), py::arg("L"), py::arg("D"), py::arg("start"),
      "Rotary embedding of x (B, H, L, D) into out on fp32 pointers; strides (b, h, l) in elements, unit stride on "
      "D; cos / sin (L - start, D/2) contiguous; tokens before `start` copied.");
}

}  // namespace fastclip
