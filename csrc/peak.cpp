// peak_rate: this CPU's arithmetic peak on torch's threads, the ceiling every GEMM figure is a fraction of.
//
// Each of torch's threads (started together) runs 12 independent accumulator chains of one instruction (more than latency x throughput on
// current x86 cores, so the loop is throughput-bound) for `iters` rounds; rate = ops / wall time:
//   fp32_fma       vfmadd (zmm where the AVX-512 path runs, else ymm): 2 FLOPs per lane
//   int8_vpdpbusd  zmm vpdpbusd (AVX-512 VNNI only): 4 u8 x s8 products + adds per int32 lane = 8 ops
//   int8_vpmaddubsw  vpmaddubsw + vpmaddwd + vpaddd (the non-VNNI int8 paths' inner step): 8 ops per int32 lane
// The kinds the CPU (and the set_avx512 switch) cannot run are absent from peak_kinds().
#include <pybind11/pybind11.h>

#include <chrono>
#include <stdexcept>
#include <string>

#include "common.h"
#include "gemm512.h"

namespace py = pybind11;

namespace fastclip {
namespace {

constexpr int kChains = 12;

bool zmm_runs() {  // the AVX-512 paths run: AVX-512F + BW present and not switched off
  static const bool bw = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bw") != 0;
  }();
  return avx512_enabled() && bw;
}

bool vnni512_present() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return has;
}

}  // namespace
}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")

namespace fastclip {
namespace {

// The 12 chains as 12 named registers (an array invites the compiler to shuffle copies between rounds).
#define FASTCLIP_CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

// Each returns a value from the chains so the loop cannot be removed, and sets *ops to the ops of one round.
template <class V, class Init, class Step, class Sum>
float chains(int64_t iters, Init init, Step step, Sum sum) {
#define FASTCLIP_DECL(i) V a##i = init(i);
  FASTCLIP_CHAINS(FASTCLIP_DECL)
#undef FASTCLIP_DECL
  for (int64_t it = 0; it < iters; ++it) {
#define FASTCLIP_STEP(i) a##i = step(a##i);
    FASTCLIP_CHAINS(FASTCLIP_STEP)
#undef FASTCLIP_STEP
  }
  float total = 0;
#define FASTCLIP_SUM(i) total += sum(a##i);
  FASTCLIP_CHAINS(FASTCLIP_SUM)
#undef FASTCLIP_SUM
  return total;
}

float hsum256(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  float s = 0;
  for (float x : t) s += x;
  return s;
}

float hsum256i(__m256i v) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  float s = 0;
  for (int32_t x : t) s += static_cast<float>(x);
  return s;
}

float fma_loop(int64_t iters, bool zmm, double* ops) {
  if (zmm) {
    const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    *ops = 32.0 * kChains;  // 16 lanes x (multiply + add)
    return chains<__m512>(iters, [](int i) { return _mm512_set1_ps(static_cast<float>(i)); },
                          [&](__m512 a) { return _mm512_fmadd_ps(a, b, c); }, [](__m512 a) { return _mm512_reduce_add_ps(a); });
  }
  const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
  *ops = 16.0 * kChains;
  return chains<__m256>(iters, [](int i) { return _mm256_set1_ps(static_cast<float>(i)); },
                        [&](__m256 a) { return _mm256_fmadd_ps(a, b, c); }, hsum256);
}

float vnni_loop(int64_t iters, double* ops) {
  const __m512i b = _mm512_set1_epi8(1), c = _mm512_set1_epi8(2);
  *ops = 128.0 * kChains;  // 16 int32 lanes x 4 (multiply + add)
  return chains<__m512i>(iters, [](int i) { return _mm512_set1_epi32(i); },
                         [&](__m512i a) { return _mm512_dpbusd_epi32(a, b, c); },
                         [](__m512i a) { return static_cast<float>(_mm512_reduce_add_epi32(a)); });
}

float maddubs_loop(int64_t iters, bool zmm, double* ops) {
  if (zmm) {
    const __m512i c = _mm512_set1_epi8(2), ones = _mm512_set1_epi16(1);
    *ops = 128.0 * kChains;
    return chains<__m512i>(iters, [](int i) { return _mm512_set1_epi32(i); },
                           [&](__m512i a) { return _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_maddubs_epi16(a, c), ones)); },
                           [](__m512i a) { return static_cast<float>(_mm512_reduce_add_epi32(a)); });
  }
  const __m256i c = _mm256_set1_epi8(2), ones = _mm256_set1_epi16(1);
  *ops = 64.0 * kChains;
  return chains<__m256i>(iters, [](int i) { return _mm256_set1_epi32(i); },
                         [&](__m256i a) { return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(a, c), ones)); },
                         hsum256i);
}

#undef FASTCLIP_CHAINS

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {
namespace {

py::list peak_kinds() {
  py::list kinds;
  if (!cpu_supported()) return kinds;
  kinds.append("fp32_fma");
  if (zmm_runs() && vnni512_present()) kinds.append("int8_vpdpbusd");
  kinds.append("int8_vpmaddubsw");
  return kinds;
}

// ops per second of `kind` over all of torch's threads (each thread runs `iters` rounds).
double peak_rate(const std::string& kind, int64_t iters) {
  if (iters <= 0) throw std::invalid_argument("peak_rate: iters must be > 0");
  bool known = false;
  for (auto k : peak_kinds()) known = known || k.cast<std::string>() == kind;
  if (!known) throw std::invalid_argument("peak_rate: " + kind + " does not run on this CPU (see peak_kinds())");
  const bool zmm = zmm_runs();
  const int threads = max_threads();
  std::atomic<double> total_ops{0};
  std::atomic<int> arrived{0};
  py::gil_scoped_release release;
  const auto start = std::chrono::steady_clock::now();
  parallel_for(threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // start together: wait (at most 50 ms) until every item has a thread, so the loops overlap in time
      arrived.fetch_add(1);
      while (arrived.load() < threads &&
             std::chrono::steady_clock::now() - start < std::chrono::milliseconds(50)) {
      }
      double ops = 0;
      volatile float sink = kind == "fp32_fma" ? fma_loop(iters, zmm, &ops)
                            : kind == "int8_vpdpbusd" ? vnni_loop(iters, &ops)
                                                      : maddubs_loop(iters, zmm, &ops);
      (void)sink;
      double seen = total_ops.load();
      while (!total_ops.compare_exchange_weak(seen, seen + ops * static_cast<double>(iters))) {
      }
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return total_ops.load() / seconds;
}

}  // namespace

void bind_peak(py::module_& m) {
  m.def("peak_kinds", &peak_kinds, "The instruction kinds peak_rate measures on this CPU (csrc/peak.cpp).");
  m.def("peak_rate", &peak_rate, py::arg("kind"), py::arg("iters") = 20000000,
        "peak_rate(kind, iters) -> ops/s of one instruction kind ('fp32_fma', 'int8_vpdpbusd', 'int8_vpmaddubsw') "
        "on torch's threads: the arithmetic ceiling of this CPU (csrc/peak.cpp).");
}

}  // namespace fastclip
