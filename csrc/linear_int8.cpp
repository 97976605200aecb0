// linear_int8: y = act(dequant(q(x) @ qW^T) + bias) for small M, with per-row (per-token) activation scales
// and per-output-channel weight scales; int32 accumulation.
//
//   packed: int8, ceil(N / 16) panels of 16 output columns, k grouped by 4 bytes (the vpdpbusd layout):
//           packed[((p * G + g) * 16 + j) * 4 + i] = qW[16 p + j, 4 g + i], G = ceil(K / 4), zero past N and
//           past K. qW[n] = round(W[n] / w_scale[n]), -128..127 (fastclip/backends/cpu/linear_int8.py packs it).
//   w_scale, colsum, bias: (16 * ceil(N / 16),) fp32 / int32 / fp32, zero padded; colsum[n] = sum_k qW[n, k].
//   x: (M, K) fp32 rows of stride sx (unit stride on K); y: (M, N) fp32 rows of stride sy. K <= 65536, so
//   every int32 sum is exact (255 * 128 * 65536 < 2^31).
//
// Activations are quantised per row inside the call, into per-thread scratch (each row first multiplied by
// x_scale (K,), per channel, where one is given: run-time smoothing, fastclip/backends/int8.py):
//   lo = min(0, min x), hi = max(0, max x), s = max((hi - lo) / L, 1e-30), z = rint(-lo * (1 / s)),
//   q = clamp(rint(x * (1 / s)) + z, 0, L)   (fp32 arithmetic, round half to even; a row with NaN or inf
//   gets s = NaN: its outputs are NaN). Then
//   y[m, n] = act(s[m] * w_scale[n] * (acc[m, n] - z[m] * colsum[n]) + bias[n]),  acc = sum_k q[m, k] qW[n, k].
//
// Paths (path(), chosen per call):
//   avx512_vnni  zmm vpdpbusd, u8 activations (L = 255); tile MR <= 6 rows x 4 panels (24 accumulators)
//   avx512       zmm vpmaddubsw + vpmaddwd, u7 (L = 127): AVX-512BW without VNNI (Skylake-SP)
//   avx_vnni     ymm vpdpbusd (VEX), u8; tile MR <= 6 rows x 1 panel (12 accumulators)
//   avx2         ymm vpmaddubsw + vpmaddwd, u7; tile MR <= 4 rows x 1 panel
// Without VNNI, vpmaddubsw adds two u8 x s8 products into an int16 with saturation: with 7-bit activations
// the pair is at most 2 * 127 * 128 = 32512 <= 32767, so it never saturates and the sums stay exact.
// set_avx512(False) / FASTCLIP_DISABLE_AVX512 drop the zmm paths; linear_int8_set_vnni(False) /
// FASTCLIP_DISABLE_VNNI drop the VNNI ones (tests run all four paths on one CPU that has everything).
//
// Blocking. Threads (torch's pool) take contiguous ranges of 64-column groups (4 panels), per block of rows
// (about 1 MiB of quantised x). Per group, every row tile sweeps the whole K: the group's panels (64 x K
// bytes, 48-192 KiB for ViT-B) stay in L2 while the row tiles re-read them, and meanwhile they prefetch the
// next group into L2 (on the zmm paths each tile a share, spread over its k loop; on the ymm paths the first
// tile), so at small M the weights stream from memory once per call (a quarter of fp32's bytes). A tile only
// accumulates (its sums stay in registers) and stores them to a small buffer that an epilogue per activation
// turns into y. Each output element is summed by one thread
// in one order: deterministic. Quantising x is a second, short parallel pass over its rows.
//
// The non-VNNI tiles are compiled in the same target regions as the VNNI ones, but they are written with
// vpmaddubsw / vpmaddwd intrinsics only, which the compiler never turns into vpdpbusd.
#include <pybind11/pybind11.h>

#include <cpuid.h>

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "activation512.h"
#include "common.h"
#include "gemm512.h"

namespace py = pybind11;

namespace fastclip {
namespace {

constexpr int64_t kPanel = 16;        // output columns per panel
constexpr int64_t kGroup = 4;         // panels per column group (64 columns)
constexpr int64_t kMaxK = 65536;      // int32 sums stay exact
constexpr int64_t kBlockBytes = 1 << 20;  // quantised x rows per row block: about this many bytes
constexpr float kMinScale = 1e-30f;   // smallest activation scale (an all-zero row: q = z = 0)

enum Path { kNoPath = 0, kAvx2 = 1, kAvxVnni = 2, kAvx512 = 3, kAvx512Vnni = 4 };
constexpr const char* kPathNames[] = {"", "avx2", "avx_vnni", "avx512", "avx512_vnni"};

std::atomic<bool> vnni_off{false};

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

bool avx_vnni_present() {  // CPUID.(EAX=7, ECX=1):EAX bit 4
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return cpu_supported() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4));
  }();
  return has;
}

bool avx512bw_present() {
  static const bool has = [] {
    __builtin_cpu_init();
    return avx512_present() && __builtin_cpu_supports("avx512bw");
  }();
  return has;
}

bool avx512_vnni_present() {
  static const bool has = [] { return avx512bw_present() && __builtin_cpu_supports("avx512vnni"); }();
  return has;
}

bool vnni_enabled() {
  static const bool env_off = env_flag("FASTCLIP_DISABLE_VNNI");
  return !env_off && !vnni_off.load(std::memory_order_relaxed);
}

Path path() {
  if (!cpu_supported()) return kNoPath;
  const bool vnni = vnni_enabled();
  if (avx512_enabled() && avx512bw_present()) return vnni && avx512_vnni_present() ? kAvx512Vnni : kAvx512;
  return vnni && avx_vnni_present() ? kAvxVnni : kAvx2;
}

int levels(Path p) { return p == kAvx512Vnni || p == kAvxVnni ? 255 : 127; }

bool set_vnni(bool on) {
  const bool was = vnni_enabled();
  vnni_off.store(!on, std::memory_order_relaxed);
  return was;
}

// Per-thread scratch of the calling thread, reused across calls (the pool's threads read it).
uint8_t* byte_scratch(size_t n) {
  thread_local std::vector<uint8_t> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// Item i of n split into `parts` contiguous near-equal ranges: [begin, end).
inline int64_t split(int64_t n, int64_t parts, int64_t i) { return i * n / parts; }

}  // namespace
}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {
namespace {

// xq[m, 0:K4] = q(x[m, 0:K] * xs) (0 past K), s[m], z[m]: the row quantisation of the header, L levels;
// xs: (K,) per-channel input scales, or nullptr for none (the row is quantised as it is).
void quantize_rows(const float* x, int64_t sx, const float* xs, int64_t M, int64_t K, int64_t K4, int L,
                   uint8_t* xq, float* s, int32_t* z) {
  parallel_for(M, std::max<int64_t>(1, 32768 / K4), [&](int64_t r0, int64_t r1) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i vmax8 = _mm256_set1_epi8(static_cast<char>(L));
    std::vector<float> scaled(xs ? static_cast<size_t>(K) : 0);
    for (int64_t m = r0; m < r1; ++m) {
      const float* xr = x + m * sx;
      if (xs) {  // the row times xs, once, into this thread's buffer: both passes below read it
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
          _mm256_storeu_ps(scaled.data() + k, _mm256_mul_ps(_mm256_loadu_ps(xr + k), _mm256_loadu_ps(xs + k)));
        for (; k < K; ++k) scaled[k] = xr[k] * xs[k];
        xr = scaled.data();
      }
      // min / max / NaN over the row: four independent chains, then one
      __m256 lo4[4], hi4[4], nan4[4];
      for (int i = 0; i < 4; ++i) lo4[i] = hi4[i] = nan4[i] = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 32 <= K; k += 32) {
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m256 v = _mm256_loadu_ps(xr + k + 8 * i);
          lo4[i] = _mm256_min_ps(lo4[i], v);
          hi4[i] = _mm256_max_ps(hi4[i], v);
          nan4[i] = _mm256_or_ps(nan4[i], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
      }
      __m256 vlo = _mm256_min_ps(_mm256_min_ps(lo4[0], lo4[1]), _mm256_min_ps(lo4[2], lo4[3]));
      __m256 vhi = _mm256_max_ps(_mm256_max_ps(hi4[0], hi4[1]), _mm256_max_ps(hi4[2], hi4[3]));
      __m256 nan = _mm256_or_ps(_mm256_or_ps(nan4[0], nan4[1]), _mm256_or_ps(nan4[2], nan4[3]));
      for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      if (k < K) {  // masked lanes read as 0, which is in the range already
        const __m256 v = _mm256_maskload_ps(xr + k, tail_mask(K - k));
        vlo = _mm256_min_ps(vlo, v);
        vhi = _mm256_max_ps(vhi, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      const float lo = -hmax(_mm256_sub_ps(_mm256_setzero_ps(), vlo)), hi = hmax(vhi);
      uint8_t* q = xq + m * K4;
      const float range = hi - lo;
      if (_mm256_movemask_ps(nan) || !std::isfinite(range)) {  // NaN or inf in the row: NaN outputs
        s[m] = std::numeric_limits<float>::quiet_NaN(), z[m] = 0;
        std::memset(q, 0, static_cast<size_t>(K4));
        continue;
      }
      const float scale = std::max(range / static_cast<float>(L), kMinScale), inv = 1.0f / scale;
      const int32_t zp = std::min<int32_t>(std::max<int32_t>(static_cast<int32_t>(std::nearbyint(-lo * inv)), 0), L);
      s[m] = scale, z[m] = zp;
      const __m256 vinv = _mm256_set1_ps(inv);
      const __m256i vz = _mm256_set1_epi32(zp);
      auto quant8 = [&](const float* p) {
        return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p), vinv)), vz);
      };
      for (k = 0; k + 32 <= K; k += 32) {  // int32 -> int16 -> u8 with saturation (clamps at 0 and 255)
        const __m256i ab = _mm256_packs_epi32(quant8(xr + k), quant8(xr + k + 8));
        const __m256i cd = _mm256_packs_epi32(quant8(xr + k + 16), quant8(xr + k + 24));
        const __m256i v = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), _mm256_min_epu8(v, vmax8));
      }
      for (; k < K; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xr[k] * inv)) + zp;
        q[k] = static_cast<uint8_t>(std::min(std::max(v, 0), L));
      }
      for (; k < K4; ++k) q[k] = 0;
    }
  });
}

// y[0:valid] = act(sr * w_scale * (acc - zr * colsum) + bias) for the 16 columns of one panel (acc: 2 ymm).
template <int ACT>
inline void store16_avx2(__m256i a0, __m256i a1, float sr, int32_t zr, const float* ws, const int32_t* cs,
                         const float* bias, float* y, int64_t valid) {
  const __m256i vz = _mm256_set1_epi32(zr);
  const __m256 vs = _mm256_set1_ps(sr);
  const __m256i acc[2] = {a0, a1};
  alignas(32) float out[16];
  for (int h = 0; h < 2; ++h) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cs + 8 * h));
    const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[h], _mm256_mullo_epi32(vz, c)));
    const __m256 sc = _mm256_mul_ps(vs, _mm256_loadu_ps(ws + 8 * h));
    _mm256_store_ps(out + 8 * h, activate<ACT>(_mm256_fmadd_ps(v, sc, _mm256_loadu_ps(bias + 8 * h))));
  }
  if (valid == 16) {
    _mm256_storeu_ps(y, _mm256_load_ps(out));
    _mm256_storeu_ps(y + 8, _mm256_load_ps(out + 8));
  } else {
    for (int64_t j = 0; j < valid; ++j) y[j] = out[j];
  }
}

template <int ACT>
void epilogue_ymm_act(const int32_t* acc, int64_t mr, const float* s, const int32_t* z, const float* ws,
                      const int32_t* cs, const float* bias, float* y, int64_t sy, int64_t valid) {
  for (int64_t r = 0; r < mr; ++r) {
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 16 * r));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(acc + 16 * r + 8));
    store16_avx2<ACT>(a0, a1, s[r], z[r], ws, cs, bias, y + r * sy, valid);
  }
}

// y[r, 0:valid] for r < mr from the int32 sums acc[r * 16 + 0:16] of one panel.
void epilogue_ymm(int act, const int32_t* acc, int64_t mr, const float* s, const int32_t* z, const float* ws,
                  const int32_t* cs, const float* bias, float* y, int64_t sy, int64_t valid) {
  switch (act) {
    case kGelu: epilogue_ymm_act<kGelu>(acc, mr, s, z, ws, cs, bias, y, sy, valid); break;
    case kGeluTanh: epilogue_ymm_act<kGeluTanh>(acc, mr, s, z, ws, cs, bias, y, sy, valid); break;
    case kQuickGelu: epilogue_ymm_act<kQuickGelu>(acc, mr, s, z, ws, cs, bias, y, sy, valid); break;
    default: epilogue_ymm_act<kNone>(acc, mr, s, z, ws, cs, bias, y, sy, valid); break;
  }
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")

namespace fastclip {
namespace {

// One ymm tile: acc[r * 16 + 0:16] = sum_g xq[r, 4g:4g+4] . panel[g] for rows r < MR of xq (rows ld apart)
// and one panel (G groups of 64 bytes); pf: the same panel of the next column group, prefetched into L2.
template <int MR, bool VNNI>
void tile_ymm(const uint8_t* xq, int64_t ld, int64_t G, const int8_t* panel, int32_t* acc, const char* pf) {
  __m256i c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < G; ++g) {
    if (pf) _mm_prefetch(pf + 64 * g, _MM_HINT_T1);
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + 64 * g));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + 64 * g + 32));
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, xq + r * ld + 4 * g, 4);
      const __m256i a = _mm256_set1_epi32(a4);
      if (VNNI) {
        c0[r] = _mm256_dpbusd_avx_epi32(c0[r], a, b0);
        c1[r] = _mm256_dpbusd_avx_epi32(c1[r], a, b1);
      } else {
        c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b0), ones));
        c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b1), ones));
      }
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 16 * r), c0[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 16 * r + 8), c1[r]);
  }
}

template <bool VNNI>
void tile_ymm_rows(int64_t mr, const uint8_t* xq, int64_t ld, int64_t G, const int8_t* panel, int32_t* acc,
                   const char* pf) {
  switch (mr) {
#define FASTCLIP_T(R) \
  case R: tile_ymm<R, VNNI>(xq, ld, G, panel, acc, pf); break;
    FASTCLIP_T(6) FASTCLIP_T(5) FASTCLIP_T(4) FASTCLIP_T(3) FASTCLIP_T(2) FASTCLIP_T(1)
#undef FASTCLIP_T
    default: break;
  }
}

// Rows [0, M) x column groups [c0, c1) on the ymm paths: per group, per row tile, each of its panels.
template <bool VNNI>
void groups_ymm(const uint8_t* xq, int64_t K4, int64_t M, const int8_t* packed, const float* s, const int32_t* z,
                const float* ws, const int32_t* cs, const float* bias, float* y, int64_t sy, int64_t N, int act,
                int64_t c0, int64_t c1, int64_t P) {
  const int64_t G = K4 / 4, panel_bytes = 64 * G;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t p0 = c * kGroup, p1 = std::min(P, p0 + kGroup);
    row_tiles(M, VNNI ? 6 : 4, [&](int64_t m, int64_t mr) {
      for (int64_t p = p0; p < p1; ++p) {
        const int8_t* panel = packed + p * panel_bytes;
        const int64_t n0 = p * kPanel, valid = std::min<int64_t>(kPanel, N - n0);
        const char* pf = m == 0 && p + kGroup < P ? reinterpret_cast<const char*>(panel + kGroup * panel_bytes)
                                                  : nullptr;
        alignas(64) int32_t acc[6 * 16];  // (mr, 16) int32 sums
        tile_ymm_rows<VNNI>(mr, xq + m * K4, K4, G, panel, acc, pf);
        epilogue_ymm(act, acc, mr, s + m, z + m, ws + n0, cs + n0, bias + n0, y + m * sy + n0, sy, valid);
      }
    });
  }
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")

namespace fastclip {
namespace {

// y[0:16 masked] = act(sr * w_scale * (acc - zr * colsum) + bias) for the 16 columns of one panel.
template <int ACT>
inline void store16_512(__m512i acc, float sr, int32_t zr, const float* ws, const int32_t* cs, const float* bias,
                        float* y, __mmask16 mask) {
  const __m512i c = _mm512_loadu_si512(cs);
  const __m512 v = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(zr), c)));
  const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(sr), _mm512_loadu_ps(ws));
  _mm512_mask_storeu_ps(y, mask, activate512<ACT>(_mm512_fmadd_ps(v, sc, _mm512_loadu_ps(bias))));
}

template <int ACT>
void epilogue_zmm_act(const int32_t* acc, int64_t mr, int64_t np, const float* s, const int32_t* z, const float* ws,
                      const int32_t* cs, const float* bias, float* y, int64_t sy, int64_t valid) {
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < np; ++j) {
      const int64_t o = 16 * j;
      store16_512<ACT>(_mm512_loadu_si512(acc + 64 * r + o), s[r], z[r], ws + o, cs + o, bias + o, y + r * sy + o,
                       mask16(valid - o));
    }
}

// y[r, 0:valid] for r < mr from the int32 sums acc[r * 64 + 0:16 np] of np panels.
void epilogue_zmm(int act, const int32_t* acc, int64_t mr, int64_t np, const float* s, const int32_t* z,
                  const float* ws, const int32_t* cs, const float* bias, float* y, int64_t sy, int64_t valid) {
  switch (act) {
    case kGelu: epilogue_zmm_act<kGelu>(acc, mr, np, s, z, ws, cs, bias, y, sy, valid); break;
    case kGeluTanh: epilogue_zmm_act<kGeluTanh>(acc, mr, np, s, z, ws, cs, bias, y, sy, valid); break;
    case kQuickGelu: epilogue_zmm_act<kQuickGelu>(acc, mr, np, s, z, ws, cs, bias, y, sy, valid); break;
    default: epilogue_zmm_act<kNone>(acc, mr, np, s, z, ws, cs, bias, y, sy, valid); break;
  }
}

// One zmm tile: acc[r * 64 + 16 j + 0:16] = sum_g xq[r, 4g:4g+4] . panel_j[g] for rows r < MR of xq (rows
// ld apart) and NP consecutive panels (panel_bytes apart); pf .. pf + 64 pf_lines: this tile's share of the
// next column group's panels, prefetched into L2 evenly over its k loop.
template <int MR, int NP, bool VNNI>
void tile_zmm(const uint8_t* xq, int64_t ld, int64_t G, const int8_t* panel, int64_t panel_bytes, int32_t* acc,
              const char* pf, int64_t pf_lines) {
  __m512i c[MR][NP];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) c[r][j] = _mm512_setzero_si512();
  const __m512i ones = _mm512_set1_epi16(1);
  int64_t owed = 0;  // Bresenham: after g steps, g * pf_lines / G lines are prefetched
  for (int64_t g = 0; g < G; ++g) {
    for (owed += pf_lines; owed >= G; owed -= G, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    __m512i b[NP];
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) b[j] = _mm512_loadu_si512(panel + j * panel_bytes + 64 * g);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, xq + r * ld + 4 * g, 4);
      const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j)
        c[r][j] = VNNI ? _mm512_dpbusd_epi32(c[r][j], a, b[j])
                       : _mm512_add_epi32(c[r][j], _mm512_madd_epi16(_mm512_maddubs_epi16(a, b[j]), ones));
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) _mm512_storeu_si512(acc + 64 * r + 16 * j, c[r][j]);
}

template <int NP, bool VNNI>
void rows_zmm(const uint8_t* xq, int64_t K4, int64_t M, const int8_t* panel, int64_t panel_bytes, const float* s,
              const int32_t* z, const float* ws, const int32_t* cs, const float* bias, float* y, int64_t sy,
              int64_t valid, int act, const char* pf, int64_t pf_bytes) {
  const int64_t G = K4 / 4;
  // The next group (pf_bytes from pf, contiguous) is prefetched in equal shares by every row tile, so the
  // memory reads spread over the whole group rather than crowding into its first tile.
  const int64_t lines = ceil_div(pf_bytes, 64), share = ceil_div(lines, ceil_div(M, 6));
  int64_t t = 0;
  row_tiles(M, 6, [&](int64_t m, int64_t mr) {
    const uint8_t* a = xq + m * K4;
    const int64_t first = std::min(lines, t++ * share), n = std::min(lines - first, share);  // 0 without pf
    alignas(64) int32_t acc[6 * 64];  // (mr, 16 NP) int32 sums
    switch (mr) {
#define FASTCLIP_T(R) \
  case R: tile_zmm<R, NP, VNNI>(a, K4, G, panel, panel_bytes, acc, pf + 64 * first, n); break;
      FASTCLIP_T(6) FASTCLIP_T(5) FASTCLIP_T(4) FASTCLIP_T(3) FASTCLIP_T(2) FASTCLIP_T(1)
#undef FASTCLIP_T
      default: break;
    }
    epilogue_zmm(act, acc, mr, NP, s + m, z + m, ws, cs, bias, y + m * sy, sy, valid);
  });
}

// Rows [0, M) x column groups [c0, c1) on the zmm paths: one tile spans a group's (up to) 4 panels.
template <bool VNNI>
void groups_zmm(const uint8_t* xq, int64_t K4, int64_t M, const int8_t* packed, const float* s, const int32_t* z,
                const float* ws, const int32_t* cs, const float* bias, float* y, int64_t sy, int64_t N, int act,
                int64_t c0, int64_t c1, int64_t P) {
  const int64_t panel_bytes = 16 * K4;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t p = c * kGroup, np = std::min(kGroup, P - p), n0 = p * kPanel;
    const int8_t* panel = packed + p * panel_bytes;
    const int64_t next = std::min(kGroup, P - p - np);  // panels of the next group
    const char* pf = next > 0 ? reinterpret_cast<const char*>(panel + np * panel_bytes) : nullptr;
    const int64_t pf_bytes = next * panel_bytes;  // the next group's panels, contiguous after this group's
    const int64_t valid = std::min<int64_t>(np * kPanel, N - n0);
    switch (np) {
#define FASTCLIP_R(NP)                                                                                          \
  case NP:                                                                                                      \
    rows_zmm<NP, VNNI>(xq, K4, M, panel, panel_bytes, s, z, ws + n0, cs + n0, bias + n0, y + n0, sy, valid, act, \
                       pf, pf_bytes);                                                                           \
    break;
      FASTCLIP_R(4) FASTCLIP_R(3) FASTCLIP_R(2) FASTCLIP_R(1)
#undef FASTCLIP_R
      default: break;
    }
  }
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {

// The whole call (declared in csrc/ops.h; the caller releases the GIL): quantise x into the calling thread's
// scratch, then the GEMM, threads over (row block, contiguous range of column groups) items.
void linear_int8(const float* x, int64_t sx, const float* xs, const int8_t* packed, const float* ws, const int32_t* cs,
                 const float* bias, float* y, int64_t sy, int64_t M, int64_t N, int64_t K, int act) {
  const Path p = path();
  if (p == kNoPath) throw std::runtime_error("linear_int8: this CPU lacks AVX2/FMA");
  const int64_t K4 = round_up(K, 4), P = ceil_div(N, kPanel), groups = ceil_div(P, kGroup);
  uint8_t* buf = byte_scratch(static_cast<size_t>(round_up(M * K4, 64) + 8 * M));
  uint8_t* xq = buf;  // (M, K4) u8
  auto* s = reinterpret_cast<float*>(buf + round_up(M * K4, 64));  // (M,) row scales
  auto* z = reinterpret_cast<int32_t*>(s + M);                      // (M,) row zero points
  quantize_rows(x, sx, xs, M, K, K4, levels(p), xq, s, z);
  const int64_t block_rows = std::max<int64_t>(6, kBlockBytes / K4 / 12 * 12), blocks = ceil_div(M, block_rows);
  const int64_t parts = std::min<int64_t>(groups, max_threads());
  parallel_for(blocks * parts, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / parts, t = i % parts, r0 = b * block_rows, rows = std::min(M, r0 + block_rows) - r0;
      const int64_t c0 = split(groups, parts, t), c1 = split(groups, parts, t + 1);
      const uint8_t* xb = xq + r0 * K4;
      float* yb = y + r0 * sy;
      switch (p) {
#define FASTCLIP_G(F) F(xb, K4, rows, packed, s + r0, z + r0, ws, cs, bias, yb, sy, N, act, c0, c1, P)
        case kAvx512Vnni: FASTCLIP_G(groups_zmm<true>); break;
        case kAvx512: FASTCLIP_G(groups_zmm<false>); break;
        case kAvxVnni: FASTCLIP_G(groups_ymm<true>); break;
        default: FASTCLIP_G(groups_ymm<false>); break;
#undef FASTCLIP_G
      }
    }
  });
}

void bind_linear_int8(py::module_& m) {
  m.def(
      "linear_int8_path", [] { return std::string(kPathNames[path()]); },
      "The path linear_int8 runs now: 'avx512_vnni' / 'avx_vnni' (u8 activations), 'avx512' / 'avx2' (u7), or '' "
      "(no AVX2/FMA). set_avx512(False) / FASTCLIP_DISABLE_AVX512 drop the avx512 paths, linear_int8_set_vnni(False) "
      "/ FASTCLIP_DISABLE_VNNI the VNNI ones.");
  m.def("linear_int8_set_vnni", &set_vnni, py::arg("on"),
        "linear_int8_set_vnni(on) -> previous: let linear_int8 use VNNI (vpdpbusd) where the CPU has it (on, the "
        "default) or never (off, for tests: the vpmaddubsw paths with 7-bit activations).");
  m.def(
      "linear_int8",
      [](uintptr_t x, int64_t sx, uintptr_t packed, uintptr_t w_scale, uintptr_t colsum, uintptr_t bias, uintptr_t y,
         int64_t sy, int64_t M, int64_t N, int64_t K, int act, uintptr_t x_scale) {
        if (act < 0 || act >= kNumActs) throw std::invalid_argument("linear_int8: unknown activation code");
        if (M <= 0 || N <= 0 || K <= 0 || K > kMaxK || sx < 0 || sy < N)
          throw std::invalid_argument("linear_int8: bad sizes or strides (need M, N > 0, 0 < K <= 65536, sy >= N)");
        if (!x || !packed || !w_scale || !colsum || !bias || !y)
          throw std::invalid_argument("linear_int8: null pointer (bias is required: zeros for none)");
        py::gil_scoped_release release;
        linear_int8(reinterpret_cast<const float*>(x), sx, reinterpret_cast<const float*>(x_scale),
                    reinterpret_cast<const int8_t*>(packed),
                    reinterpret_cast<const float*>(w_scale), reinterpret_cast<const int32_t*>(colsum),
                    reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), sy, M, N, K, act);
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("x"), py::arg("sx"), py::arg("packed"), py::arg("w_scale"), py::arg("colsum"), py::arg("bias"),
      py::arg("y"), py::arg("sy"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("act"), py::arg("x_scale") = 0,
      "y = act(s_x[m] w_scale[n] (q(x * x_scale) . qW[n] - z[m] colsum[n]) + bias[n]) (csrc/linear_int8.cpp): x (M, K) "
      "fp32 rows sx apart, x_scale (K,) fp32 per-channel input scales or 0 for none, packed int8 panels, "
      "w_scale/colsum/bias padded to 16 * ceil(N / 16), y (M, N) rows sy apart.");
}

}  // namespace fastclip
