// The AVX2 + FMA path of the packed linear kernel (csrc/linear.cpp): y = act(x @ W^T + bias) with W packed
// into panels of kNR2 = 16 columns (two ymm), for CPUs without AVX-512 (AMD Zen 2/3, Intel client cores).
//
//   packed: ceil(N / 16) panels, packed[(p * K + k) * 16 + j] = W[16 p + j, k] (zero past N).
//   x: (M, K) rows of stride sx (unit stride on K); bias: (N,) or nullptr; y: (M, N) rows of stride sy.
//
// The AVX-512 path's design scaled to 16 ymm registers and a 32 KiB L1: a tile is MR <= 6 rows x 16 columns
// (12 accumulators, two panel loads and six broadcasts per k, k unrolled by four), K is swept in chunks of
// ~256 (a panel's chunk is 16 KiB and stays in L1 while every row tile passes over it), and while the tiles
// of one chunk run they prefetch the next chunk into L2. Unlike the AVX-512 path, each thread first copies
// its rows' chunk of x into tile order ([k][r], MR floats a k): the broadcasts then read one contiguous
// stream at fixed offsets whatever x's row stride, which leaves the FMA ports the loop's only limit
// (about 1.1-1.2x the rate of reading x in place one k a loop, hot in cache). Each k step of a row is one
// small asm statement (broadcast, two FMAs into the row's accumulators): compiled from intrinsics, GCC
// spilled accumulators to the stack and shuffled them between registers, and the tile ran at 0.74 of the
// AVX-512 path's rate on the same cores (Zen 4, weights hot; 0.90-0.95 in asm). Each output is summed by one
// thread in one order -- the AVX-512 path's order, so both paths give the same bits.
#pragma once

#include "activation.h"
#include "common.h"

namespace fastclip {
namespace avx2_linear {

constexpr int64_t kNR2 = 16;  // output columns per panel (two ymm)
constexpr int kMaxMR2 = 6;    // rows per tile
constexpr int64_t kKC2 = 256;  // k per chunk: a panel chunk is kKC2 x 16 floats (16 KiB)
constexpr int64_t kChunkRowsBytes = 256 << 10;  // x rows per block: their chunk (rows x kKC2 floats) ~256 KiB

}  // namespace avx2_linear
}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {
namespace avx2_linear {

// The columns [0, 16) of a panel that exist: all (full), or the lanes of m0 (columns 0-7) and m1 (8-15).
struct Cols {
  bool full;
  __m256i m0, m1;
};

// y[0:MR, 0:16] (+)= A[0:kc, 0:MR]^T @ panel[0:kc, 0:16] for one k chunk. A: the tile's rows of x packed as
// [k][r] (MR floats a k); panel: rows of 16 floats; y: rows ldy apart. The first chunk starts from zero,
// later ones add to y; the last adds the bias and applies the activation. pf .. pf + pf_bytes: memory to
// prefetch into L2 meanwhile (evenly over k).
template <int MR, int ACT>
void tile(int64_t kc, const float* A, const float* panel, const float* bias, float* y, int64_t ldy,
          const Cols& cols, bool first, bool last, const char* pf, int64_t pf_bytes) {
  const bool full = cols.full;  // locals: the stores to y cannot alias them
  const __m256i m0 = cols.m0, m1 = cols.m1;
  const auto load = [&](const float* p, __m256i m) { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m); };
  const auto store = [&](float* p, __m256i m, __m256 v) {
    if (full) _mm256_storeu_ps(p, v);
    else _mm256_maskstore_ps(p, m, v);
  };
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    c0[r] = first ? _mm256_setzero_ps() : load(y + r * ldy, m0);
    c1[r] = first ? _mm256_setzero_ps() : load(y + r * ldy + 8, m1);
  }
  const auto step = [&](int64_t k) __attribute__((always_inline)) {
    const __m256 b0 = _mm256_loadu_ps(panel + kNR2 * k), b1 = _mm256_loadu_ps(panel + kNR2 * k + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      // c0[r] += a b0, c1[r] += a b1 with a = A[k MR + r] broadcast, as _mm256_fmadd_ps(a, b, c) rounds it;
      // in asm so that each accumulator keeps its register (the header says why).
      asm("vbroadcastss %[a], %%ymm15\n\t"
          "vfmadd231ps %[b0], %%ymm15, %[c0]\n\t"
          "vfmadd231ps %[b1], %%ymm15, %[c1]"
          : [c0] "+x"(c0[r]), [c1] "+x"(c1[r])
          : [a] "m"(A[k * MR + r]), [b0] "x"(b0), [b1] "x"(b1)
          : "xmm15");
    }
  };
  const int64_t lines = pf ? pf_bytes / 64 : 0;
  int64_t owed = 0, k = 0;  // Bresenham: after k steps, k * lines / kc lines are prefetched
  for (; k + 4 <= kc; k += 4) {
    for (owed += 4 * lines; owed >= kc; owed -= kc, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) step(k + u);
  }
  for (; k < kc; ++k) {
    for (owed += lines; owed >= kc; owed -= kc, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    step(k);
  }
  if (!last) {
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      store(y + r * ldy, m0, c0[r]);
      store(y + r * ldy + 8, m1, c1[r]);
    }
    return;
  }
  const __m256 bias0 = bias ? load(bias, m0) : _mm256_setzero_ps();
  const __m256 bias1 = bias ? load(bias + 8, m1) : _mm256_setzero_ps();
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    store(y + r * ldy, m0, activate<ACT>(_mm256_add_ps(c0[r], bias0)));
    store(y + r * ldy + 8, m1, activate<ACT>(_mm256_add_ps(c1[r], bias1)));
  }
}

template <int ACT>
void tile_rows(int mr, int64_t kc, const float* A, const float* panel, const float* bias, float* y,
               int64_t ldy, const Cols& cols, bool first, bool last, const char* pf, int64_t pf_bytes) {
  switch (mr) {
#define FASTCLIP_TILE2(R) \
  case R: tile<R, ACT>(kc, A, panel, bias, y, ldy, cols, first, last, pf, pf_bytes); break;
    FASTCLIP_TILE2(6) FASTCLIP_TILE2(5) FASTCLIP_TILE2(4) FASTCLIP_TILE2(3) FASTCLIP_TILE2(2) FASTCLIP_TILE2(1)
#undef FASTCLIP_TILE2
    default: break;
  }
}

// Rows [r0, r1) x panels [p0, p1): for each k chunk, x's chunk packed in tile order (thread-local, at most
// kChunkRowsBytes), then for each panel every row tile; meanwhile the tiles prefetch the chunk that comes
// next (the next panel's, or the first panel's next chunk).
template <int ACT>
void block(const float* x, int64_t sx, const float* packed, const float* bias, float* y, int64_t sy, int64_t N,
           int64_t K, int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
  const int64_t tiles = ceil_div(r1 - r0, kMaxMR2);
  const int64_t chunks = ceil_div(K, kKC2), panel_floats = kNR2 * K;
  thread_local std::vector<float> buf;
  float* const xp = scratch(buf, (r1 - r0) * std::min(K, kKC2));  // a chunk is at most this deep
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * K / chunks, kc = (c + 1) * K / chunks - k0;
    // x[r0:r1, k0:k0 + kc] in tile order: the tile of rows [m, m + mr) at xp + m kc, as [k][r].
    row_tiles(r1 - r0, kMaxMR2, [&](int64_t m, int64_t mr) {
      float* dst = xp + m * kc;
      const float* src = x + (r0 + m) * sx + k0;
      for (int64_t r = 0; r < mr; ++r)
        for (int64_t k = 0; k < kc; ++k) dst[k * mr + r] = src[r * sx + k];
    });
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kNR2, valid = std::min<int64_t>(kNR2, N - n0);
      const Cols cols{valid == kNR2, tail_mask(std::min<int64_t>(valid, 8)),
                      tail_mask(std::max<int64_t>(valid - 8, 0))};
      const float* panel = packed + p * panel_floats + kNR2 * k0;
      const char* next = nullptr;  // the chunk after this one, and its size in bytes
      int64_t next_bytes = 0;
      if (p + 1 < p1) {
        next = reinterpret_cast<const char*>(panel + panel_floats), next_bytes = 4 * kNR2 * kc;
      } else if (c + 1 < chunks) {
        const int64_t k1 = (c + 1) * K / chunks, kc1 = (c + 2) * K / chunks - k1;
        next = reinterpret_cast<const char*>(packed + p0 * panel_floats + kNR2 * k1), next_bytes = 4 * kNR2 * kc1;
      }
      const int64_t share = round_up(ceil_div(next_bytes, tiles), 64);  // bytes of `next` per tile
      int64_t t = 0;
      row_tiles(r1 - r0, kMaxMR2, [&](int64_t m, int64_t mr) {
        const int64_t r = r0 + m, off = std::min(t++ * share, next_bytes);
        tile_rows<ACT>(static_cast<int>(mr), kc, xp + m * kc, panel, bias ? bias + n0 : nullptr,
                       y + r * sy + n0, sy, cols, c == 0, c + 1 == chunks, next ? next + off : nullptr,
                       std::min(share, next_bytes - off));
      });
    }
  }
}

// x: (M, K) rows sx apart; packed: the panels of W (N, K); bias: (N,) or nullptr; y: (M, N) rows sy apart.
template <int ACT>
void linear_f32(const float* x, int64_t sx, const float* packed, const float* bias, float* y, int64_t sy, int64_t M,
                int64_t N, int64_t K) {
  const int64_t panels = ceil_div(N, kNR2);
  const int64_t block_rows =
      std::max<int64_t>(kMaxMR2, kChunkRowsBytes / (4 * std::min(K, kKC2)) / kMaxMR2 * kMaxMR2);
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

}  // namespace avx2_linear
}  // namespace fastclip

#pragma GCC pop_options
