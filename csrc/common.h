// Shared pieces of the fastclip CPU kernels: torch's OpenMP pool, AVX2/FMA math, a small-GEMM tile.
//
// Threads. The kernels never start threads of their own and link no OpenMP runtime. They call the
// GOMP entry points of the OpenMP runtime that is already loaded in the process -- torch's bundled
// libgomp (found at the first parallel call with dl_iterate_phdr, see module.cpp). So there is one
// thread pool, torch's, and torch.set_num_threads() governs it (torch forwards it to
// omp_set_num_threads). Without a loaded runtime (torch not imported) the kernels run serially.
//
// Code generation. Everything below the `#pragma GCC target` line is compiled for AVX2 + FMA; the
// pybind11 glue is compiled for baseline x86-64, so importing fastclip._C on an older CPU cannot fault
// and fastclip.backends.cpu can refuse to load there (module.cpp: cpu_supported()).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <vector>

namespace fastclip {

// Element strides of the B, H and L dims of a (B, H, L, D) view with unit stride on D (attention, rotary).
struct Strides {
  int64_t b, h, l;
};

// ------------------------------------------------------------------------------------------ threads
struct OmpRuntime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel
  int (*thread_num)() = nullptr;
  int (*team_size)() = nullptr;  // omp_get_num_threads
  int (*max_threads)() = nullptr;
  int (*in_parallel)() = nullptr;
  const char* path = nullptr;
};

// The OpenMP runtime loaded in this process (torch's), or nullptr. Defined in module.cpp.
const OmpRuntime* omp_runtime();

inline int max_threads() {
  const OmpRuntime* rt = omp_runtime();
  return rt ? std::max(1, rt->max_threads()) : 1;
}

// f(begin, end) over [0, n) in chunks of `grain`, handed out dynamically to torch's OpenMP threads.
// f must not throw. Serial inside an enclosing parallel region or when one chunk covers everything.
template <class F>
void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const OmpRuntime* rt = chunks > 1 ? omp_runtime() : nullptr;
  int64_t nt = 1;
  if (rt && !rt->in_parallel()) nt = std::min<int64_t>(rt->max_threads(), chunks);
  if (nt <= 1) {
    f(0, n);
    return;
  }
  struct Ctx {
    const F* f;
    int64_t n, grain;
    std::atomic<int64_t> next;
  } ctx{&f, n, grain, {0}};
  rt->parallel(
      [](void* p) {
        Ctx& c = *static_cast<Ctx*>(p);
        for (;;) {
          const int64_t b = c.next.fetch_add(c.grain);
          if (b >= c.n) break;
          (*c.f)(b, std::min(c.n, b + c.grain));
        }
      },
      &ctx, static_cast<unsigned>(nt), 0);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// f(first_row, rows) for M rows cut into ceil(M / max_rows) tiles of near-equal height (50 rows, at most
// 12 a tile -> five tiles of 10; never a thin tail).
template <class F>
inline void row_tiles(int64_t M, int64_t max_rows, const F& f) {
  const int64_t tiles = ceil_div(M, max_rows), base = M / tiles, extra = M % tiles;
  for (int64_t t = 0, m = 0; t < tiles; ++t) {
    const int64_t rows = base + (t < extra);
    f(m, rows);
    m += rows;
  }
}

// Per-thread scratch that grows and is reused across calls (a few hundred KiB at most).
template <class T>
inline T* scratch(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

bool cpu_supported();   // AVX2 and FMA present (module.cpp)
bool avx512_present();  // AVX-512F (with AVX2 and FMA) present (module.cpp)

}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {

// ------------------------------------------------------------------------------------------ vectors
// Lanes [0, n) set, n in [0, 8].
inline __m256i tail_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), idx);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x), Cephes' expf polynomial (~1 ulp); exactly 0 below -87.33 (incl. -inf), +inf above 88.72, NaN kept.
inline __m256 exp_ps(__m256 x) {
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654475f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.72283905f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// erf(x): the odd/even rational minimax approximation on [-4, 4] that Eigen and XLA use for float
// (erf is +-1 in float outside it); a few ulp, 12 FMAs and one divide, no exp. NaN stays NaN.
inline __m256 erf_ps(__m256 x) {
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(4.0f)), _mm256_set1_ps(-4.0f));
  const __m256 x2 = _mm256_mul_ps(xc, xc);
  __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(xc, p);
  __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_blendv_ps(_mm256_div_ps(p, q), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// tanh(x) = 1 - 2 / (exp(2x) + 1); absolute error ~1e-7.
inline __m256 tanh_ps(__m256 x) {
  const __m256 e = exp_ps(_mm256_add_ps(x, x));
  return _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
}

// ------------------------------------------------------------------------------------------ small GEMM
// C[r, 0:8*NV] (+)= sum_k A[r*lda + k] * B[k*ldb + 0:8*NV] for r < MR (A: broadcast scalars, B: rows of
// NV vectors). With MASK the last vector of B and C is read/written only in the lanes of `mask`.
template <int MR, int NV, bool MASK>
inline void gemm_tile(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool accumulate, __m256i mask) {
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* p = C + r * ldc + 8 * v;
      c[r][v] = !accumulate ? _mm256_setzero_ps()
                : (MASK && v == NV - 1) ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
    }
  for (int64_t k = 0; k < K; ++k) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      const float* p = B + k * ldb + 8 * v;
      b[v] = (MASK && v == NV - 1) ? _mm256_maskload_ps(p, mask) : _mm256_loadu_ps(p);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[r][v] = _mm256_fmadd_ps(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* p = C + r * ldc + 8 * v;
      if (MASK && v == NV - 1) _mm256_maskstore_ps(p, mask, c[r][v]);
      else _mm256_storeu_ps(p, c[r][v]);
    }
}

// M rows in row tiles of at most 6 (row_tiles).
template <int NV, bool MASK>
inline void gemm_rows(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool acc, __m256i mask) {
  row_tiles(M, 6, [&](int64_t m, int64_t mr) {
    const float* At = A + m * lda;
    float* Ct = C + m * ldc;
    switch (mr) {
      case 6: gemm_tile<6, NV, MASK>(K, At, lda, B, ldb, Ct, ldc, acc, mask); break;
      case 5: gemm_tile<5, NV, MASK>(K, At, lda, B, ldb, Ct, ldc, acc, mask); break;
      case 4: gemm_tile<4, NV, MASK>(K, At, lda, B, ldb, Ct, ldc, acc, mask); break;
      case 3: gemm_tile<3, NV, MASK>(K, At, lda, B, ldb, Ct, ldc, acc, mask); break;
      case 2: gemm_tile<2, NV, MASK>(K, At, lda, B, ldb, Ct, ldc, acc, mask); break;
      default: gemm_tile<1, NV, MASK>(K, At, lda, B, ldb, Ct, ldc, acc, mask); break;
    }
  });
}

// C[M x N] (+)= A[M x K] @ B[K x N]. A: rows of stride lda. B: column tiles of 16; tile t starts at
// B + t * b_tile and its rows are ldb apart (row-major B: b_tile = 16, ldb = row stride; B packed in
// 16-wide panels: b_tile = 16 * K, ldb = 16). C: rows of stride ldc.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t b_tile,
                 int64_t ldb, float* C, int64_t ldc, bool acc) {
  const __m256i full = _mm256_set1_epi32(-1);
  for (int64_t n0 = 0, t = 0; n0 < N; n0 += 16, ++t) {
    const int64_t nn = std::min<int64_t>(16, N - n0);
    const float* Bt = B + t * b_tile;
    float* Ct = C + n0;
    if (nn == 16) gemm_rows<2, false>(M, K, A, lda, Bt, ldb, Ct, ldc, acc, full);
    else if (nn > 8) gemm_rows<2, true>(M, K, A, lda, Bt, ldb, Ct, ldc, acc, tail_mask(nn - 8));
    else if (nn == 8) gemm_rows<1, false>(M, K, A, lda, Bt, ldb, Ct, ldc, acc, full);
    else gemm_rows<1, true>(M, K, A, lda, Bt, ldb, Ct, ldc, acc, tail_mask(nn));
  }
}

// Transposes the 8x8 block src[r][0:8] (rows ld apart) into dst[c][0:8] (rows ldd apart).
inline void transpose8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ld), r2 = _mm256_loadu_ps(src + 2 * ld),
         r3 = _mm256_loadu_ps(src + 3 * ld), r4 = _mm256_loadu_ps(src + 4 * ld), r5 = _mm256_loadu_ps(src + 5 * ld),
         r6 = _mm256_loadu_ps(src + 6 * ld), r7 = _mm256_loadu_ps(src + 7 * ld);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44); r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44); r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  r4 = _mm256_shuffle_ps(t4, t6, 0x44); r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  r6 = _mm256_shuffle_ps(t5, t7, 0x44); r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst, _mm256_permute2f128_ps(r0, r4, 0x20));
  _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(r1, r5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(r2, r6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(r3, r7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(r0, r4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(r1, r5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(r2, r6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(r3, r7, 0x31));
}

// dst[k][0:16] = B[k][0:n] zero-padded to 16 (n <= 16), k < K: a 16-wide panel of a row-major matrix,
// contiguous, so a GEMM over it never walks a large (e.g. power-of-two) row stride.
inline void pack_panel(const float* B, int64_t ldb, int64_t K, int64_t n, float* dst) {
  if (n == 16) {
    for (int64_t k = 0; k < K; ++k) {
      _mm256_storeu_ps(dst + 16 * k, _mm256_loadu_ps(B + k * ldb));
      _mm256_storeu_ps(dst + 16 * k + 8, _mm256_loadu_ps(B + k * ldb + 8));
    }
    return;
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t j = 0; j < n; ++j) dst[16 * k + j] = B[k * ldb + j];
    for (int64_t j = n; j < 16; ++j) dst[16 * k + j] = 0.0f;
  }
}

// ------------------------------------------------------------------------------------------ layer norm row
// y = (s - mean(s)) / sqrt(var(s) + eps) * w + b over one row of D floats, s = x (+ r, also stored to s_out).
inline void layer_norm_row(const float* x, const float* r, float* s_out, const float* w, const float* b,
                           float* y, int64_t D, float eps) {
  const int64_t Dv = D & ~int64_t(7);
  const __m256i tm = tail_mask(D - Dv);
  const float* s = x;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  if (r) {
    int64_t d = 0;
    for (; d + 16 <= Dv; d += 16) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(r + d));
      const __m256 u = _mm256_add_ps(_mm256_loadu_ps(x + d + 8), _mm256_loadu_ps(r + d + 8));
      _mm256_storeu_ps(s_out + d, v);
      _mm256_storeu_ps(s_out + d + 8, u);
      acc0 = _mm256_add_ps(acc0, v);
      acc1 = _mm256_add_ps(acc1, u);
    }
    for (; d < Dv; d += 8) {
      const __m256 v = _mm256_add_ps(_mm256_loadu_ps(x + d), _mm256_loadu_ps(r + d));
      _mm256_storeu_ps(s_out + d, v);
      acc0 = _mm256_add_ps(acc0, v);
    }
    if (d < D) {
      const __m256 v = _mm256_add_ps(_mm256_maskload_ps(x + d, tm), _mm256_maskload_ps(r + d, tm));
      _mm256_maskstore_ps(s_out + d, tm, v);
      acc1 = _mm256_add_ps(acc1, v);
    }
    s = s_out;
  } else {
    int64_t d = 0;
    for (; d + 16 <= Dv; d += 16) {
      acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(x + d));
      acc1 = _mm256_add_ps(acc1, _mm256_loadu_ps(x + d + 8));
    }
    for (; d < Dv; d += 8) acc0 = _mm256_add_ps(acc0, _mm256_loadu_ps(x + d));
    if (d < D) acc1 = _mm256_add_ps(acc1, _mm256_maskload_ps(x + d, tm));
  }
  // Corrected two-pass statistics: a second pass sums d = s - mean and d^2, so the mean is refined to
  // mean + sum(d) / D and var = (sum(d^2) - sum(d)^2 / D) / D (accurate for rows far from zero mean).
  const float mean0 = hsum(_mm256_add_ps(acc0, acc1)) / static_cast<float>(D);
  __m256 vm = _mm256_set1_ps(mean0);
  __m256 sd0 = _mm256_setzero_ps(), sd1 = _mm256_setzero_ps();
  acc0 = _mm256_setzero_ps();
  acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= Dv; d += 16) {
    const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(s + d), vm), c = _mm256_sub_ps(_mm256_loadu_ps(s + d + 8), vm);
    sd0 = _mm256_add_ps(sd0, a);
    sd1 = _mm256_add_ps(sd1, c);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
    acc1 = _mm256_fmadd_ps(c, c, acc1);
  }
  for (; d < Dv; d += 8) {
    const __m256 a = _mm256_sub_ps(_mm256_loadu_ps(s + d), vm);
    sd0 = _mm256_add_ps(sd0, a);
    acc0 = _mm256_fmadd_ps(a, a, acc0);
  }
  if (d < D) {
    const __m256 a = _mm256_and_ps(_mm256_sub_ps(_mm256_maskload_ps(s + d, tm), vm), _mm256_castsi256_ps(tm));
    sd1 = _mm256_add_ps(sd1, a);
    acc1 = _mm256_fmadd_ps(a, a, acc1);
  }
  const float sum_d = hsum(_mm256_add_ps(sd0, sd1));
  const float mean = mean0 + sum_d / static_cast<float>(D);
  const float var = std::max(0.0f, (hsum(_mm256_add_ps(acc0, acc1)) - sum_d * sum_d / static_cast<float>(D)) /
                                       static_cast<float>(D));
  vm = _mm256_set1_ps(mean);
  const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(var + eps));
  for (d = 0; d < Dv; d += 8) {
    const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + d), vm), rstd);
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(n, _mm256_loadu_ps(w + d), _mm256_loadu_ps(b + d)));
  }
  if (d < D) {
    const __m256 n = _mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(s + d, tm), vm), rstd);
    _mm256_maskstore_ps(y + d, tm, _mm256_fmadd_ps(n, _mm256_maskload_ps(w + d, tm), _mm256_maskload_ps(b + d, tm)));
  }
}

}  // namespace fastclip

#pragma GCC pop_options
