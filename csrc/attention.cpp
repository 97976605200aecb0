// attention: softmax(q k^T * scale [+ causal mask]) v, fp32, blocked with an online softmax.
//
//   q: (B, H, Lq, D), k/v: (B, H, Lk, D), out: (B, H, Lq, D); any element strides for B, H, L, unit
//   stride for D (so q/k/v may be views of one packed (B, L, 3, H, D) qkv tensor). Causal: query i
//   sees keys 0..i (Lq == Lk). key_lengths: (B,) int32 or null: batch b sees keys 0..key_lengths[b]-1
//   only (a key-padding mask that is a prefix); a query that sees no key gets zeros. Any D and lengths.
//
// Work item = (batch, head, block of <= BQ queries), handed out to torch's OpenMP threads. A thread packs
// K^T (16-key panels, zero-padded) and V (D padded to 8) of its (batch, head) once into its scratch,
// then for each block of <= BK keys: S = Q K^T (FMA tiles reading the strided q rows directly: 6x16 with
// AVX2, 12x32 with AVX-512F, see gemm512.h),
// online softmax (running row max m and sum l, O rescaled by exp(m_old - m_new); zmm where the CPU has
// AVX-512F), O += P V. The
// result O / l is written straight into `out`'s strided rows. No copies of q/k/v outside the scratch.
// rope_cos / rope_sin (N, D/2) or null, rope_start: rotary q and k (query / key i at position i, positions
// >= rope_start rotated by angle row i - rope_start, csrc/rotary.h): each head's keys are rotated into the
// scratch before packing, each query block into a scratch block before its tiles read it.
#include <pybind11/pybind11.h>

#include "activation512.h"
#include "attention_bf16.h"
#include "common.h"
#include "gemm512.h"
#include "rotary.h"

namespace py = pybind11;

namespace fastclip {
namespace {

constexpr int64_t kMaxBQ = 64;   // queries per work item
constexpr int64_t kMaxBK = 256;  // keys per softmax block: ViT-B/16's 197 and NaFlex's 256 keys in one

}  // namespace
}  // namespace fastclip

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

namespace fastclip {
namespace {

// softmax_row (below) on 16 lanes, for CPUs with AVX-512F: the same p = exp(s * scale - m_new) per element
// (exp512_ps equals exp_ps lane by lane); only the order of the row sum's additions differs.
float softmax_row512(float* s, int64_t valid, int64_t n, float scale, float& m, float& l) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 16 <= valid; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  if (j < valid) {
    const __mmask16 tm = mask16(valid - j);
    mx = _mm512_mask_max_ps(mx, tm, mx, _mm512_maskz_loadu_ps(tm, s + j));
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx) * scale);
  if (m_new == -INFINITY) {  // nothing visible yet (never happens with key 0 always visible)
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const __m512 vscale = _mm512_set1_ps(scale), vneg = _mm512_set1_ps(-m_new);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + 16 <= valid; j += 16) {
    const __m512 p = exp512_ps(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vscale, vneg));
    sum = _mm512_add_ps(sum, p);
    _mm512_storeu_ps(s + j, p);
  }
  if (j < valid) {  // the last partial vector; its lanes past `valid` become the first masked zeros
    const __mmask16 tm = mask16(valid - j);
    const __m512 p = _mm512_maskz_mov_ps(tm, exp512_ps(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tm, s + j), vscale, vneg)));
    sum = _mm512_add_ps(sum, p);
    _mm512_mask_storeu_ps(s + j, mask16(n - j), p);
    j += 16;
  }
  for (; j < n; ++j) s[j] = 0.0f;
  const float alpha = m == -INFINITY ? 1.0f : std::exp(m - m_new);  // first block: l and O are still 0
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = m_new;
  return alpha;
}

}  // namespace
}  // namespace fastclip

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace fastclip {
namespace {

// Kp[t][d][c] = k[16 t + c][d] (zero for keys >= Lk); Vp[j][d] = v[j][d] (zero for d >= D).
void pack_kv(const float* k, int64_t skl, const float* v, int64_t svl, int64_t Lk, int64_t D, int64_t Dp,
             float* Kp, float* Vp) {
  const int64_t Lkp = round_up(Lk, 16), L8 = Lk & ~int64_t(7), D8 = D & ~int64_t(7);
  for (int64_t j = 0; j < L8; j += 8) {  // 8 keys x 8 dims at a time
    float* dst = Kp + (j / 16) * D * 16 + (j % 16);
    for (int64_t d = 0; d < D8; d += 8) transpose8x8(k + j * skl + d, skl, dst + d * 16, 16);
    for (int64_t c = 0; c < 8; ++c)
      for (int64_t d = D8; d < D; ++d) dst[d * 16 + c] = k[(j + c) * skl + d];
  }
  for (int64_t j = L8; j < Lkp; ++j) {
    float* dst = Kp + (j / 16) * D * 16 + (j % 16);
    if (j < Lk) {
      const float* src = k + j * skl;
      for (int64_t d = 0; d < D; ++d) dst[d * 16] = src[d];
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d * 16] = 0.0f;
    }
  }
  for (int64_t j = 0; j < Lk; ++j) {
    std::memcpy(Vp + j * Dp, v + j * svl, D * sizeof(float));
    for (int64_t d = D; d < Dp; ++d) Vp[j * Dp + d] = 0.0f;
  }
}

// Online-softmax step for one row: s[0:valid) are raw scores (s[valid:n) masked); overwrites s[0:n)
// with p = exp(s * scale - m_new), updates m and l, and returns alpha = exp(m_old - m_new).
float softmax_row(float* s, int64_t valid, int64_t n, float scale, float& m, float& l) {
  const int64_t vv = valid & ~int64_t(7);
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j < vv; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + j));
  float rmax = hmax(mx);
  for (; j < valid; ++j) rmax = std::max(rmax, s[j]);
  const float m_new = std::max(m, rmax * scale);
  if (m_new == -INFINITY) {  // nothing visible yet (never happens with key 0 always visible)
    std::fill(s, s + n, 0.0f);
    return 1.0f;
  }
  const __m256 vscale = _mm256_set1_ps(scale), vneg = _mm256_set1_ps(-m_new);
  __m256 sum = _mm256_setzero_ps();
  for (j = 0; j < vv; j += 8) {
    const __m256 p = exp_ps(_mm256_fmadd_ps(_mm256_loadu_ps(s + j), vscale, vneg));
    sum = _mm256_add_ps(sum, p);
    _mm256_storeu_ps(s + j, p);
  }
  if (j < valid) {
    const __m256i tm = tail_mask(valid - j);
    __m256 p = exp_ps(_mm256_fmadd_ps(_mm256_maskload_ps(s + j, tm), vscale, vneg));
    p = _mm256_and_ps(p, _mm256_castsi256_ps(tm));
    sum = _mm256_add_ps(sum, p);
    _mm256_maskstore_ps(s + j, tm, p);
    j = valid;
  }
  for (; j < n; ++j) s[j] = 0.0f;
  const float alpha = m == -INFINITY ? 1.0f : std::exp(m - m_new);  // first block: l and O are still 0
  l = l * alpha + hsum(sum);
  m = m_new;
  return alpha;
}

void scale_row(float* o, int64_t n, float a) {
  const __m256 va = _mm256_set1_ps(a);
  for (int64_t d = 0; d < n; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), va));
}

// Rows [0, n) of x (stride sx) at token positions p0.. into y (n, D) contiguous, rotated by the rotary angles
// of positions >= start (cos / sin rows p - start, D/2 each, interleaved pairs); earlier positions copied.
void rotate_rows(const float* x, int64_t sx, int64_t n, int64_t p0, int64_t D, const float* cos, const float* sin,
                 int64_t start, float* y) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = p0 + r;
    if (p < start) std::memcpy(y + r * D, x + r * sx, D * sizeof(float));
    else rotate_row(x + r * sx, y + r * D, cos + (p - start) * (D / 2), sin + (p - start) * (D / 2), D);
  }
}

}  // namespace

// Declared in csrc/ops.h (the fused encoder block calls it).
void attention_f32(const float* q, Strides sq, const float* k, Strides sk, const float* v, Strides sv, float* out,
                   Strides so, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, bool causal, float scale,
                   const int32_t* key_lengths, const float* rope_cos, const float* rope_sin, int64_t rope_start,
                   bool bf16_dots) {
  const int64_t nqb = ceil_div(Lq, kMaxBQ), bq = ceil_div(Lq, nqb);
  const int64_t nkb = ceil_div(Lk, kMaxBK), bk = round_up(ceil_div(Lk, nkb), 16);
  const int64_t Lkp = round_up(Lk, 16), Dp = round_up(D, bf16_dots ? 16 : 8), D2 = ceil_div(D, 2);
  const int64_t tasks = B * H * nqb;
  // Whole (batch, head) units when there are plenty (one K/V packing each), else single query blocks.
  const int64_t grain = B * H >= 4 * max_threads() ? nqb : 1;
  const bool zmm = avx512_enabled();
  auto* const mm = zmm ? &gemm512 : &gemm;  // zmm tiles and softmax where the CPU has them
  auto* const softmax = zmm ? &softmax_row512 : &softmax_row;
  parallel_for(tasks, grain, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> kbuf, vbuf, sbuf, obuf, mlbuf, rbuf, qbuf;
    thread_local std::vector<uint32_t> kpairs, vpairs, qpairs, ppairs, rowpairs;  // bf16_dots: the header's layouts
    float* Kp = bf16_dots ? nullptr : scratch(kbuf, Lkp * D);
    float* Vp = bf16_dots ? nullptr : scratch(vbuf, Lk * Dp);
    uint32_t* Kb = bf16_dots ? scratch(kpairs, Lkp * D2) : nullptr;
    uint32_t* Vb = bf16_dots ? scratch(vpairs, ceil_div(Lk, 2) * Dp) : nullptr;
    uint32_t* Qb = bf16_dots ? scratch(qpairs, bq * D2) : nullptr;
    uint32_t* Pb = bf16_dots ? scratch(ppairs, bq * bk / 2) : nullptr;
    float* S = scratch(sbuf, bq * bk);
    float* O = scratch(obuf, bq * Dp);
    float* M = scratch(mlbuf, 2 * bq);
    float* Lsum = M + bq;
    int64_t packed = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, qb = t % nqb, b = bh / H, h = bh % H;
      if (bh != packed) {
        const float* kk = k + b * sk.b + h * sk.h;
        int64_t skl = sk.l;
        if (rope_cos) {  // rotary keys: rotated into scratch, then packed
          float* Kr = scratch(rbuf, Lk * D);
          rotate_rows(kk, skl, Lk, 0, D, rope_cos, rope_sin, rope_start, Kr);
          kk = Kr, skl = D;
        }
        if (bf16_dots) attention_bf16::pack_kv(kk, skl, v + b * sv.b + h * sv.h, sv.l, Lk, D, Dp, Kb, Vb, scratch(rowpairs, D2));
        else pack_kv(kk, skl, v + b * sv.b + h * sv.h, sv.l, Lk, D, Dp, Kp, Vp);
        packed = bh;
      }
      const int64_t i0 = qb * bq, nq = std::min(bq, Lq - i0);
      const int64_t lk = key_lengths ? std::min<int64_t>(Lk, std::max(0, key_lengths[b])) : Lk;  // visible keys
      const int64_t kend = causal ? std::min(lk, i0 + nq) : lk;
      const float* qrows = q + b * sq.b + h * sq.h + i0 * sq.l;
      int64_t sql = sq.l;
      if (rope_cos) {  // rotary queries: this block's rows rotated into scratch
        float* Qr = scratch(qbuf, bq * D);
        rotate_rows(qrows, sql, nq, i0, D, rope_cos, rope_sin, rope_start, Qr);
        qrows = Qr, sql = D;
      }
      float* orows = out + b * so.b + h * so.h + i0 * so.l;
      if (kend == 0) {  // no visible key (an all-padding row): zeros, as the reference gives
        for (int64_t r = 0; r < nq; ++r) std::memset(orows + r * so.l, 0, D * sizeof(float));
        continue;
      }
      if (bf16_dots) attention_bf16::to_pairs(qrows, sql, nq, D, Qb, D2);
      std::fill(M, M + nq, -INFINITY);
      std::fill(Lsum, Lsum + nq, 0.0f);
      for (int64_t j0 = 0; j0 < kend; j0 += bk) {
        const int64_t nk = std::min(bk, kend - j0);
        if (bf16_dots) attention_bf16::gemm(nq, round_up(nk, 16), D2, Qb, D2, Kb + (j0 / 16) * D2 * 16, 16 * D2, 16, S, bk, false);
        else mm(nq, round_up(nk, 8), D, qrows, sql, Kp + (j0 / 16) * D * 16, 16 * D, 16, S, bk, false);
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t valid = causal ? std::max<int64_t>(0, std::min(nk, i0 + r + 1 - j0)) : nk;
          if (valid == 0) {  // a causal row past this batch's keys sees nothing in this block
            std::fill(S + r * bk, S + r * bk + nk, 0.0f);
            continue;
          }
          const float alpha = softmax(S + r * bk, valid, nk, scale, M[r], Lsum[r]);
          if (alpha != 1.0f) scale_row(O + r * Dp, Dp, alpha);
        }
        if (bf16_dots) {  // P rounded to bf16 pairs along the keys, times V's pairs
          attention_bf16::to_pairs(S, bk, nq, nk, Pb, bk / 2);
          attention_bf16::gemm(nq, Dp, ceil_div(nk, 2), Pb, bk / 2, Vb + (j0 / 2) * Dp, 16, Dp, O, Dp, j0 > 0);
        } else {
          mm(nq, Dp, nk, S, bk, Vp + j0 * Dp, 16, Dp, O, Dp, /*accumulate=*/j0 > 0);
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        const float inv = Lsum[r] > 0.0f ? 1.0f / Lsum[r] : 0.0f;  // 0: a causal row that saw no key
        const float* src = O + r * Dp;
        float* dst = orows + r * so.l;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_loadu_ps(src + d), _mm256_set1_ps(inv)));
        for (; d < D; ++d) dst[d] = src[d] * inv;
      }
    }
  });
}

}  // namespace fastclip

#pragma GCC pop_options

namespace fastclip {

void bind_attention(py::module_& m) {
  m.def(
      "attention",
      [](uintptr_t q, py::tuple sq, uintptr_t k, py::tuple sk, uintptr_t v, py::tuple sv, uintptr_t out,
         py::tuple so, int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, bool causal, float scale,
         uintptr_t key_lengths, uintptr_t rope_cos, uintptr_t rope_sin, int64_t rope_start, bool bf16_dots) {
        if (bf16_dots && !attention_bf16_supported())
          throw std::invalid_argument("attention: bf16_dots needs AVX512-BF16 (see attention_bf16_supported())");
        auto st = [](py::tuple t) { return Strides{t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>()}; };
        const Strides a = st(sq), b = st(sk), c = st(sv), d = st(so);
        py::gil_scoped_release release;
        attention_f32(reinterpret_cast<const float*>(q), a, reinterpret_cast<const float*>(k), b,
                      reinterpret_cast<const float*>(v), c, reinterpret_cast<float*>(out), d, B, H, Lq, Lk, D, causal,
                      scale, reinterpret_cast<const int32_t*>(key_lengths), reinterpret_cast<const float*>(rope_cos),
                      reinterpret_cast<const float*>(rope_sin), rope_start, bf16_dots);
      },
      py::kw_only(),  // every argument by name: a swapped integer must not become a pointer
      py::arg("q"), py::arg("q_strides"), py::arg("k"), py::arg("k_strides"), py::arg("v"), py::arg("v_strides"),
      py::arg("out"), py::arg("out_strides"), py::arg("B"), py::arg("H"), py::arg("Lq"), py::arg("Lk"), py::arg("D"),
      py::arg("causal"), py::arg("scale"), py::arg("key_lengths") = 0,
      py::arg("rope_cos") = 0, py::arg("rope_sin") = 0, py::arg("rope_start") = 0, py::arg("bf16_dots") = false,
      "softmax(q k^T * scale [+ causal mask]) v on fp32 pointers; strides (b, h, l) in elements, unit stride on D; "
      "key_lengths: (B,) int32 visible keys per batch row (a prefix key-padding mask), or 0 for none; bf16_dots: "
      "both products on bf16-rounded operands with fp32 sums (csrc/attention_bf16.h).");
  m.def("attention_bf16_supported", &attention_bf16_supported,
        "True if attention(bf16_dots=True) runs here: AVX512-BF16 present and AVX-512 not switched off.");
}

}  // namespace fastclip
