// linear: y = act(x @ W^T + bias), fp32, with W packed once into panels of output columns. Two paths,
// picked at run time by the CPU's features, each with its own panel width and so its own pack layout:
//
//   AVX-512F (while avx512_enabled(): FASTCLIP_DISABLE_AVX512 / set_avx512(false) switch it off): panels
//     of 32 columns, tiles of MR <= 12 rows x 32 (24 zmm accumulators), below.
//   AVX2 + FMA (every other CPU the extension runs on, e.g. AMD Zen 2/3): panels of 16 columns, tiles of
//     MR <= 6 rows x 16 (12 ymm accumulators, two panel loads, six broadcasts a k), over a copy of x's
//     chunk in tile order, csrc/linear_avx2.h.
//
// linear_panel_width() names the path that runs now (32 or 16); linear_pack and linear take the width, and
// a pack runs only on the path of its width (a pack made before set_avx512 flipped is refused, not misread).
//
//   W: (N, K) rows of stride ldw (torch's linear weight), packed by linear_pack into ceil(N / NR) panels
//      of NR output columns: packed[(p * K + k) * NR + j] = W[NR p + j, k] (zero past N). The pack is
//      the size of W (plus the padding of the last panel) and does not depend on M.
//   x: (M, K) rows of stride sx (unit stride on K); bias: (N,) or none; y: (M, N) rows of stride sy.
//   act: none / gelu / gelu_tanh / quick_gelu (csrc/activation.h, the same code as bias_act).
//
// Blocking. A tile is MR rows x NR columns. K is swept in chunks of ~256: a panel's chunk (32 KiB at 32
// columns, 16 KiB at 16 -- within a 48 or 32 KiB L1) stays in L1 while every row tile of the block
// passes over it. Rows are cut into blocks (their chunk of x stays in L2 across the panels) and each
// block into tiles of near-equal height (50 rows -> five tiles of 10, or nine of 5-6, never a thin
// tail). Threads (torch's OpenMP pool) take (row block, panel range) items; with one row block -- small
// batches -- each thread streams its own contiguous range of panels.
//
// Prefetch. At small M a panel is used by only a few tiles, so its first read comes from memory, not
// cache: while the tiles of one panel chunk run, they prefetch the chunk that comes next into L2 (each
// tile a share of it, spread evenly over its k loop), so the next chunk is waiting when they get there.
// Inside ViT-B-32 at batch 1 (50 rows, 340 MB of weights streamed per image) this is the difference
// between about 0.61 of the sgemm rate (MKL's packed GEMM) and 0.87 (bench/bench_cpu_ops.py, streamed;
// AVX-512 path, Intel Xeon with AVX-512). The AVX2 path, forced on a Zen 4 with oneDNN held to AVX2
// (.ci/emulate-avx2), runs the same stack at 1.14x oneDNN's rate at M = 50 and at par at 197: the limits
// of both paths are in fastclip/backends/cpu/linear.py.
//
// Each output element is summed by one thread in one order (k ascending, one FMA chain), so results do
// not depend on the thread count -- nor on the path: both paths compute every output bit for bit alike.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "activation512.h"
#include "common.h"
#include "gemm512.h"
#include "linear_avx2.h"

namespace py = pybind11;

namespace fastclip {
namespace {

// The AVX-512 path.
constexpr int64_t kNR = 32;                  // output columns per panel (two zmm)
constexpr int kMaxMR = 12;                   // rows per tile
constexpr int64_t kKC = 256;                 // k per chunk: a panel chunk is kKC x 32 floats (32 KiB)
constexpr int64_t kBlockBytes = 1 << 20;     // x rows per block: about this many bytes

}  // namespace
}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

namespace fastclip {
namespace {

// y[0:MR, 0:32] (+)= A[0:MR, 0:kc] @ panel[0:kc, 0:32] for one k chunk: the first chunk starts from zero,
// later ones add to y; the last adds the bias and applies the activation. Stores are masked to the
// panel's valid columns. pf .. pf + pf_bytes: memory to prefetch into L2 meanwhile (evenly over k).
template <int MR, int ACT>
void tile(int64_t kc, const float* A, int64_t lda, const float* panel, const float* bias, float* y, int64_t ldy,
          __mmask16 m0, __mmask16 m1, bool first, bool last, const char* pf, int64_t pf_bytes) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    c0[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + r * ldy);
    c1[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + r * ldy + 16);
  }
  const int64_t lines = pf ? pf_bytes / 64 : 0;
  int64_t owed = 0;  // Bresenham: after k steps, k * lines / kc lines are prefetched
  for (int64_t k = 0; k < kc; ++k) {
    for (owed += lines; owed >= kc; owed -= kc, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    const __m512 b0 = _mm512_loadu_ps(panel + kNR * k), b1 = _mm512_loadu_ps(panel + kNR * k + 16);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
  }
  if (!last) {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      _mm512_mask_storeu_ps(y + r * ldy, m0, c0[r]);
      _mm512_mask_storeu_ps(y + r * ldy + 16, m1, c1[r]);
    }
    return;
  }
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(y + r * ldy, m0, activate512<ACT>(_mm512_add_ps(c0[r], bias0)));
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, activate512<ACT>(_mm512_add_ps(c1[r], bias1)));
  }
}

template <int ACT>
void tile_rows(int mr, int64_t kc, const float* A, int64_t lda, const float* panel, const float* bias, float* y,
               int64_t ldy, __mmask16 m0, __mmask16 m1, bool first, bool last, const char* pf, int64_t pf_bytes) {
  switch (mr) {
#define FASTCLIP_TILE(R) \
  case R: tile<R, ACT>(kc, A, lda, panel, bias, y, ldy, m0, m1, first, last, pf, pf_bytes); break;
    FASTCLIP_TILE(12) FASTCLIP_TILE(11) FASTCLIP_TILE(10) FASTCLIP_TILE(9) FASTCLIP_TILE(8) FASTCLIP_TILE(7)
    FASTCLIP_TILE(6) FASTCLIP_TILE(5) FASTCLIP_TILE(4) FASTCLIP_TILE(3) FASTCLIP_TILE(2) FASTCLIP_TILE(1)
#undef FASTCLIP_TILE
    default: break;
  }
}

// Rows [r0, r1) x panels [p0, p1): for each k chunk, for each panel, every row tile. A chunk of a panel
// (kc x 32 floats, 32 KiB) stays in L1 while the row tiles pass over it; while they do, they prefetch
// the chunk that comes next (the next panel's, or the first panel's next chunk).
template <int ACT>
void block(const float* x, int64_t sx, const float* packed, const float* bias, float* y, int64_t sy, int64_t N,
           int64_t K, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  const int64_t tiles = ceil_div(r1 - r0, kMaxMR);
  const int64_t chunks = ceil_div(K, kKC), panel_floats = kNR * K;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * K / chunks, kc = (c + 1) * K / chunks - k0;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kNR, valid = std::min<int64_t>(kNR, N - n0);
      const __mmask16 m0 = mask16(valid), m1 = mask16(valid - 16);
      const float* panel = packed + p * panel_floats + kNR * k0;
      // The chunk after this one, and its size in bytes.
      const char* next = nullptr;
      int64_t next_bytes = 0;
      if (p + 1 < p1) {
        next = reinterpret_cast<const char*>(panel + panel_floats), next_bytes = 4 * kNR * kc;
      } else if (c + 1 < chunks) {
        const int64_t k1 = (c + 1) * K / chunks, kc1 = (c + 2) * K / chunks - k1;
        next = reinterpret_cast<const char*>(packed + p0 * panel_floats + kNR * k1), next_bytes = 4 * kNR * kc1;
      }
      const int64_t share = round_up(ceil_div(next_bytes, tiles), 64);  // bytes of `next` per tile
      int64_t t = 0;  // tile index: which share of `next` this tile prefetches
      row_tiles(r1 - r0, kMaxMR, [&](int64_t m, int64_t mr) {
        const int64_t r = r0 + m, off = std::min(t++ * share, next_bytes);
        tile_rows<ACT>(static_cast<int>(mr), kc, x + r * sx + k0, sx, panel, bias ? bias + n0 : nullptr,
                       y + r * sy + n0, sy, m0, m1, c == 0, c + 1 == chunks, next ? next + off : nullptr,
                       std::min(share, next_bytes - off));
      });
    }
  }
}

// x: (M, K) rows sx apart; packed: the 32-column panels of W (N, K); bias: (N,) or nullptr; y: (M, N) rows sy apart.
template <int ACT>
void linear_f32(const float* x, int64_t sx, const float* packed, const float* bias, float* y, int64_t sy, int64_t M,
                int64_t N, int64_t K) {
  const int64_t panels = ceil_div(N, kNR);
  const int64_t block_rows = std::max<int64_t>(kMaxMR, kBlockBytes / (4 * K) / kMaxMR * kMaxMR);
  const int64_t blocks = ceil_div(M, block_rows);
  const int64_t groups = std::min<int64_t>(panels, max_threads());  // contiguous panel ranges
  parallel_for(blocks * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rb = i / groups, g = i % groups;
      block<ACT>(x, sx, packed, bias, y, sy, N, K, rb * block_rows, std::min(M, (rb + 1) * block_rows),
                 g * panels / groups, (g + 1) * panels / groups);
    }
  });
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {
namespace {

bool panel_known(int64_t panel) { return panel == kNR || panel == avx2_linear::kNR2; }

int64_t packed_size(int64_t N, int64_t K, int64_t panel) {
  if (!panel_known(panel)) throw std::invalid_argument("linear_packed_size: panel must be 16 or 32");
  return ceil_div(N, panel) * panel * K;
}

// The panel width of the path that runs now: 32 (AVX-512 enabled), 16 (AVX2 + FMA), 0 (neither).
int64_t panel_width() { return avx512_enabled() ? kNR : cpu_supported() ? avx2_linear::kNR2 : 0; }

// Packs of `panel` columns run on the path of that width: it must be the one that runs now.
void check_panel(int64_t panel, const char* op) {
  if (!panel_known(panel)) throw std::invalid_argument(std::string(op) + ": panel must be 16 or 32");
  if (panel != panel_width())
    throw std::runtime_error(std::string(op) + ": a " + std::to_string(panel) + "-column pack needs the " +
                             (panel == kNR ? "AVX-512" : "AVX2") + " path, which does not run now " +
                             "(linear_panel_width() = " + std::to_string(panel_width()) + ")");
}

// w: (N, K) rows ldw apart -> out: ceil(N / nr) panels of nr columns, out[(p K + k) nr + j] = w[nr p + j, k].
void pack(const float* w, int64_t ldw, int64_t N, int64_t K, int64_t nr, float* out) {
  parallel_for(ceil_div(N, nr), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = out + p * nr * K;
      const int64_t n0 = p * nr, valid = std::min<int64_t>(nr, N - n0);
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < valid; ++j) dst[k * nr + j] = w[(n0 + j) * ldw + k];
        for (int64_t j = valid; j < nr; ++j) dst[k * nr + j] = 0.0f;
      }
    }
  });
}

// The path of `panel` (checked by check_panel): x (M, K) rows sx apart, packed: W's panels, bias (N,) or
// nullptr, y (M, N) rows sy apart.
template <int ACT>
void run(int64_t panel, const float* x, int64_t sx, const float* packed, const float* bias, float* y, int64_t sy,
         int64_t M, int64_t N, int64_t K) {
  if (panel == kNR) linear_f32<ACT>(x, sx, packed, bias, y, sy, M, N, K);
  else avx2_linear::linear_f32<ACT>(x, sx, packed, bias, y, sy, M, N, K);
}

}  // namespace

int64_t linear_panel_width() { return panel_width(); }

// Declared in csrc/ops.h (the fused encoder block calls it; the caller checks the panel and releases the GIL).
void linear_f32_packed(int64_t panel, const float* x, int64_t sx, const float* packed, const float* bias, float* y,
                       int64_t sy, int64_t M, int64_t N, int64_t K, int act) {
  switch (act) {
    case kNone: run<kNone>(panel, x, sx, packed, bias, y, sy, M, N, K); break;
    case kGelu: run<kGelu>(panel, x, sx, packed, bias, y, sy, M, N, K); break;
    case kGeluTanh: run<kGeluTanh>(panel, x, sx, packed, bias, y, sy, M, N, K); break;
    default: run<kQuickGelu>(panel, x, sx, packed, bias, y, sy, M, N, K); break;
  }
}

void bind_linear(py::module_& m) {
  m.def("linear_supported", &cpu_supported,
        "True if the packed linear kernel runs here: its AVX2 + FMA path on any such CPU, its AVX-512 path "
        "where linear_panel_width() is 32.");
  m.def("linear_panel_width", &panel_width,
        "Columns per panel of the packed linear path that runs now: 32 (AVX-512, while avx512 is enabled), "
        "16 (AVX2 + FMA), 0 (none). A pack has the layout of one width and runs only on that path.");
  m.def("linear_packed_size", &packed_size, py::arg("N"), py::arg("K"), py::arg("panel"),
        "Floats in the pack of an (N, K) weight in panels of `panel` (16 or 32) columns.");
  m.def(
      "linear_pack",
      [](uintptr_t w, int64_t ldw, int64_t N, int64_t K, int64_t panel, uintptr_t out) {
        check_panel(panel, "linear_pack");
        if (N <= 0 || K <= 0 || ldw < K) throw std::invalid_argument("linear_pack: need N, K > 0 and ldw >= K");
        py::gil_scoped_release release;
        pack(reinterpret_cast<const float*>(w), ldw, N, K, panel, reinterpret_cast<float*>(out));
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("w"), py::arg("ldw"), py::arg("N"), py::arg("K"), py::arg("panel"), py::arg("out"),
      "Pack the (N, K) fp32 weight w (rows ldw apart) into out (linear_packed_size(N, K, panel) floats) in "
      "panels of `panel` columns; panel must be linear_panel_width().");
  m.def(
      "linear",
      [](uintptr_t x, int64_t sx, uintptr_t packed, int64_t panel, uintptr_t bias, uintptr_t y, int64_t sy, int64_t M,
         int64_t N, int64_t K, int act) {
        check_panel(panel, "linear");
        if (act < 0 || act >= kNumActs) throw std::invalid_argument("linear: unknown activation code");
        if (M < 0 || N <= 0 || K <= 0 || sx < 0 || sy < N) throw std::invalid_argument("linear: bad sizes or strides");
        const auto* xp = reinterpret_cast<const float*>(x);
        const auto* pp = reinterpret_cast<const float*>(packed);
        const auto* bp = reinterpret_cast<const float*>(bias);
        auto* yp = reinterpret_cast<float*>(y);
        py::gil_scoped_release release;
        linear_f32_packed(panel, xp, sx, pp, bp, yp, sy, M, N, K, act);
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("x"), py::arg("sx"), py::arg("packed"), py::arg("panel"), py::arg("bias"), py::arg("y"), py::arg("sy"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("act"),
      "y = act(x @ W^T + bias) with W packed by linear_pack in panels of `panel` columns (bias 0: none); fp32 "
      "pointers, row strides in elements; act: a code of activation_codes().");
}

}  // namespace fastclip
