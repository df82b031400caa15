// See fold.h. The check loop mirrors delta_sq_lanes (norm.cc) and adds the bound test; the fold loop is the
// coordinator's float64 axpy (sums + a * x, one rounding each for the product and the sum).
#include "fold.h"

#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

// Values must equal the JS twin's bit for bit: no a*b+c contracted into a fused multiply-add (this pragma is
// -ffp-contract=off for every function below, the AVX ones included; none of them asks for the FMA instruction set,
// and the object file holds no vfmadd/vfmsub).
#pragma GCC optimize("fp-contract=off")
// GCC 12's own AVX-512 conversion intrinsics trip this warning (their "undefined" source operand).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace medfl {

namespace {

#if defined(__SSE2__)
// The four lanes as two float64 vectors (s0, s1) and (s2, s3): each lane still adds its own values in index order,
// with a separate multiply and add (no FMA), so the sums are the scalar loop's bit for bit. The bound test is a
// vector compare of |proposed weight| (in float64, exact) with max_value; NaN compares false, as in the scalar loop.
bool check_block(const float* x, const float* b, bool is_delta, int64_t n, double max_value, double* s) {
  const int64_t n4 = n - n % 4;
  __m128d s01 = _mm_set_pd(s[1], s[0]);
  __m128d s23 = _mm_set_pd(s[3], s[2]);
  const __m128d bound = _mm_set1_pd(max_value);
  const __m128d abs_mask = _mm_castsi128_pd(_mm_set1_epi64x(0x7fffffffffffffffLL));
  __m128d ok = _mm_cmpeq_pd(bound, bound);  // all ones (max_value is a number)
  for (int64_t i = 0; i < n4; i += 4) {
    const __m128 xv = _mm_loadu_ps(x + i);
    const __m128d x01 = _mm_cvtps_pd(xv);
    const __m128d x23 = _mm_cvtps_pd(_mm_movehl_ps(xv, xv));
    __m128d a01 = x01, a23 = x23, p01 = x01, p23 = x23;
    if (b) {
      const __m128 bv = _mm_loadu_ps(b + i);
      const __m128d b01 = _mm_cvtps_pd(bv);
      const __m128d b23 = _mm_cvtps_pd(_mm_movehl_ps(bv, bv));
      if (is_delta) {
        p01 = _mm_add_pd(b01, x01);
        p23 = _mm_add_pd(b23, x23);
      } else {
        a01 = _mm_sub_pd(x01, b01);
        a23 = _mm_sub_pd(x23, b23);
      }
    }
    s01 = _mm_add_pd(s01, _mm_mul_pd(a01, a01));
    s23 = _mm_add_pd(s23, _mm_mul_pd(a23, a23));
    ok = _mm_and_pd(ok, _mm_cmple_pd(_mm_and_pd(p01, abs_mask), bound));
    ok = _mm_and_pd(ok, _mm_cmple_pd(_mm_and_pd(p23, abs_mask), bound));
  }
  double lanes[4];
  _mm_storeu_pd(lanes, s01);
  _mm_storeu_pd(lanes + 2, s23);
  bool all = _mm_movemask_pd(ok) == 3;
  for (int64_t i = n4; i < n; ++i) {
    const double xi = x[i];
    const double ai = b && !is_delta ? xi - b[i] : xi;
    lanes[0] += ai * ai;
    all &= std::fabs(is_delta ? b[i] + xi : xi) <= max_value;
  }
  for (int k = 0; k < 4; ++k) s[k] = lanes[k];
  return all;
}
#else
// True when every proposed weight of the block is finite and within ±max_value; adds the block's squares to the
// lanes (n mod 4 values past the last group of four into lane 0, as the JS loop does).
bool check_block(const float* x, const float* b, bool is_delta, int64_t n, double max_value, double* s) {
  const int64_t n4 = n - n % 4;
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const double xi = x[i];
    const double ai = b && !is_delta ? xi - b[i] : xi;
    s[i < n4 ? i % 4 : 0] += ai * ai;
    // NaN compares false: !(|v| <= bound) catches it with the infinities and the too-large values.
    ok &= std::fabs(is_delta ? b[i] + xi : xi) <= max_value;
  }
  return ok;
}
#endif

// The fold of the values from..len one at a time (every vector loop ends with it).
void fold_tail(const float* const* xs, int k, int64_t at, int64_t from, int64_t len, double* acc, const double* a) {
  for (int64_t i = from; i < len; ++i) {
    double s = acc[i];
    for (int j = 0; j < k; ++j) s += a[j] * static_cast<double>(xs[j][at + i]);
    acc[i] = s;
  }
}

// sums[i] += a[0]·xs[0][i], then += a[1]·xs[1][i], … for i < len: the sum stays in a register between updates.
void fold_block_batch(const float* const* xs, int k, int64_t at, int64_t len, double* acc, const double* a) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= len; i += 4) {
    __m128d s01 = _mm_loadu_pd(acc + i);
    __m128d s23 = _mm_loadu_pd(acc + i + 2);
    for (int j = 0; j < k; ++j) {
      const __m128 xv = _mm_loadu_ps(xs[j] + at + i);
      const __m128d aj = _mm_set1_pd(a[j]);
      s01 = _mm_add_pd(s01, _mm_mul_pd(aj, _mm_cvtps_pd(xv)));
      s23 = _mm_add_pd(s23, _mm_mul_pd(aj, _mm_cvtps_pd(_mm_movehl_ps(xv, xv))));
    }
    _mm_storeu_pd(acc + i, s01);
    _mm_storeu_pd(acc + i + 2, s23);
  }
#endif
  fold_tail(xs, k, at, i, len, acc, a);
}

#if defined(__x86_64__)
// ---- AVX2 and AVX-512: the same operations per value as above, in the same order, more values per instruction. ----
// The norm lanes keep their layout: four float64 lanes, lane l adding the squares of the values at 4m + l in order
// of m. A 256-bit vector is exactly those four lanes; a 512-bit vector of squares (eight values) is added to them as
// its low half and then its high half. Each lane is one chain of dependent adds, so a batch checks up to four
// updates in one loop (four independent chains, one base conversion for the four); the bound is tested on the
// float32 values themselves against bound_f32 (no conversion), except for a delta upload, whose proposed weight
// b + x exists only in float64.

enum Mode { kPlain, kMinusBase, kDelta };  // no base; norm of x − b; delta upload (weight b + x)

// The largest float32 not above m: for a float32 v, |v| <= m exactly when |v| <= bound_f32(m), with infinities and
// NaN (false either way) included.
float bound_f32(double m) {
  float f = static_cast<float>(m);
  if (static_cast<double>(f) > m) f = std::nextafter(f, -INFINITY);
  return f;
}

// The values past the last group of four of one update: into lane 0, in index order (as check_block does).
template <Mode M>
bool check_tail(const float* x, const float* b, int64_t from, int64_t n, double max_value, double* s) {
  bool ok = true;
  for (int64_t i = from; i < n; ++i) {
    const double xi = x[i];
    const double ai = M == kMinusBase ? xi - b[i] : xi;
    s[0] += ai * ai;
    ok &= std::fabs(M == kDelta ? b[i] + xi : xi) <= max_value;
  }
  return ok;
}

// One group of four values of G updates (at i), in 256-bit vectors: squares into the lanes, the bound in float64.
template <Mode M, int G>
__attribute__((target("avx2"), always_inline)) inline void check_four_avx2(const float* const* xs, const float* b,
                                                                          int64_t i, __m256d* acc, __m256d& ok,
                                                                          __m256d bound) {
  const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
  __m256d b4 = _mm256_setzero_pd();
  if (M != kPlain) b4 = _mm256_cvtps_pd(_mm_loadu_ps(b + i));
  for (int g = 0; g < G; ++g) {
    __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(xs[g] + i));
    const __m256d p = M == kDelta ? _mm256_add_pd(b4, v) : v;
    ok = _mm256_and_pd(ok, _mm256_cmp_pd(_mm256_and_pd(p, abs_mask), bound, _CMP_LE_OQ));
    if (M == kMinusBase) v = _mm256_sub_pd(v, b4);
    acc[g] = _mm256_add_pd(acc[g], _mm256_mul_pd(v, v));
  }
}

// check_block for G updates at once (lanes of xs[g] at lanes + 4g), eight values per step.
template <Mode M, int G>
__attribute__((target("avx2"))) bool check_group_avx2(const float* const* xs, const float* b, int64_t n,
                                                      double max_value, float bound32, double* lanes) {
  const int64_t n4 = n - n % 4;
  __m256d acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_loadu_pd(lanes + 4 * g);
  const __m256d abs_pd = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
  const __m256 abs_ps = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256d bound_pd = _mm256_set1_pd(max_value);
  const __m256 bound_ps = _mm256_set1_ps(bound32);
  __m256d ok_pd = _mm256_castsi256_pd(_mm256_set1_epi32(-1));
  __m256 ok_ps = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t i = 0;
  for (; i + 8 <= n4; i += 8) {
    __m256d b0 = _mm256_setzero_pd(), b1 = b0;
    if (M != kPlain) {
      b0 = _mm256_cvtps_pd(_mm_loadu_ps(b + i));
      b1 = _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4));
    }
    for (int g = 0; g < G; ++g) {
      const __m256 xf = _mm256_loadu_ps(xs[g] + i);
      __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(xf));
      __m256d v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(xf, 1));
      if (M == kDelta) {
        ok_pd = _mm256_and_pd(ok_pd, _mm256_cmp_pd(_mm256_and_pd(_mm256_add_pd(b0, v0), abs_pd), bound_pd, _CMP_LE_OQ));
        ok_pd = _mm256_and_pd(ok_pd, _mm256_cmp_pd(_mm256_and_pd(_mm256_add_pd(b1, v1), abs_pd), bound_pd, _CMP_LE_OQ));
      } else {
        ok_ps = _mm256_and_ps(ok_ps, _mm256_cmp_ps(_mm256_and_ps(xf, abs_ps), bound_ps, _CMP_LE_OQ));
      }
      if (M == kMinusBase) {
        v0 = _mm256_sub_pd(v0, b0);
        v1 = _mm256_sub_pd(v1, b1);
      }
      acc[g] = _mm256_add_pd(acc[g], _mm256_mul_pd(v0, v0));
      acc[g] = _mm256_add_pd(acc[g], _mm256_mul_pd(v1, v1));
    }
  }
  if (i < n4) {
    check_four_avx2<M, G>(xs, b, i, acc, ok_pd, bound_pd);
    i += 4;
  }
  bool all = _mm256_movemask_ps(ok_ps) == 0xff && _mm256_movemask_pd(ok_pd) == 0xf;
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_pd(lanes + 4 * g, acc[g]);
    all &= check_tail<M>(xs[g], b, n4, n, max_value, lanes + 4 * g);
  }
  return all;
}

// The same for AVX-512, sixteen values per step: their squares as two 512-bit vectors, added to the four lanes a
// 256-bit half at a time in index order.
template <Mode M, int G>
__attribute__((target("avx512f"))) bool check_group_avx512(const float* const* xs, const float* b, int64_t n,
                                                          double max_value, float bound32, double* lanes) {
  const int64_t n4 = n - n % 4;
  __m256d acc[G];
  for (int g = 0; g < G; ++g) acc[g] = _mm256_loadu_pd(lanes + 4 * g);
  const __m512d bound_pd = _mm512_set1_pd(max_value);
  const __m512 bound_ps = _mm512_set1_ps(bound32);
  __mmask8 ok_pd = 0xff;
  __mmask16 ok_ps = 0xffff;
  int64_t i = 0;
  for (; i + 16 <= n4; i += 16) {
    __m512d b0 = _mm512_setzero_pd(), b1 = b0;
    if (M != kPlain) {
      b0 = _mm512_cvtps_pd(_mm256_loadu_ps(b + i));
      b1 = _mm512_cvtps_pd(_mm256_loadu_ps(b + i + 8));
    }
    for (int g = 0; g < G; ++g) {
      const float* x = xs[g] + i;
      __m512d v0 = _mm512_cvtps_pd(_mm256_loadu_ps(x));
      __m512d v1 = _mm512_cvtps_pd(_mm256_loadu_ps(x + 8));
      if (M == kDelta) {
        ok_pd &= _mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_add_pd(b0, v0)), bound_pd, _CMP_LE_OQ);
        ok_pd &= _mm512_cmp_pd_mask(_mm512_abs_pd(_mm512_add_pd(b1, v1)), bound_pd, _CMP_LE_OQ);
      } else {
        ok_ps &= _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x)), bound_ps, _CMP_LE_OQ);
      }
      if (M == kMinusBase) {
        v0 = _mm512_sub_pd(v0, b0);
        v1 = _mm512_sub_pd(v1, b1);
      }
      const __m512d q0 = _mm512_mul_pd(v0, v0);
      const __m512d q1 = _mm512_mul_pd(v1, v1);
      acc[g] = _mm256_add_pd(acc[g], _mm512_castpd512_pd256(q0));
      acc[g] = _mm256_add_pd(acc[g], _mm512_extractf64x4_pd(q0, 1));
      acc[g] = _mm256_add_pd(acc[g], _mm512_castpd512_pd256(q1));
      acc[g] = _mm256_add_pd(acc[g], _mm512_extractf64x4_pd(q1, 1));
    }
  }
  __m256d ok4 = _mm256_castsi256_pd(_mm256_set1_epi32(-1));
  const __m256d bound4 = _mm256_set1_pd(max_value);
  for (; i < n4; i += 4) check_four_avx2<M, G>(xs, b, i, acc, ok4, bound4);
  bool all = ok_pd == 0xff && ok_ps == 0xffff && _mm256_movemask_pd(ok4) == 0xf;
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_pd(lanes + 4 * g, acc[g]);
    all &= check_tail<M>(xs[g], b, n4, n, max_value, lanes + 4 * g);
  }
  return all;
}

// k updates' blocks checked, four at a time; false at the first group holding a value that fails.
template <Mode M, bool (*Group1)(const float* const*, const float*, int64_t, double, float, double*),
          bool (*Group2)(const float* const*, const float*, int64_t, double, float, double*),
          bool (*Group3)(const float* const*, const float*, int64_t, double, float, double*),
          bool (*Group4)(const float* const*, const float*, int64_t, double, float, double*)>
bool check_groups(const float* const* xs, int k, const float* b, int64_t n, double max_value, float bound32,
                  double* lanes) {
  int j = 0;
  for (; j + 4 <= k; j += 4)
    if (!Group4(xs + j, b, n, max_value, bound32, lanes + 4 * j)) return false;
  switch (k - j) {
    case 3: return Group3(xs + j, b, n, max_value, bound32, lanes + 4 * j);
    case 2: return Group2(xs + j, b, n, max_value, bound32, lanes + 4 * j);
    case 1: return Group1(xs + j, b, n, max_value, bound32, lanes + 4 * j);
    default: return true;
  }
}

template <Mode M>
bool check_avx2(const float* const* xs, int k, const float* b, int64_t n, double max_value, float bound32,
                double* lanes) {
  return check_groups<M, check_group_avx2<M, 1>, check_group_avx2<M, 2>, check_group_avx2<M, 3>,
                      check_group_avx2<M, 4>>(xs, k, b, n, max_value, bound32, lanes);
}

template <Mode M>
bool check_avx512(const float* const* xs, int k, const float* b, int64_t n, double max_value, float bound32,
                  double* lanes) {
  return check_groups<M, check_group_avx512<M, 1>, check_group_avx512<M, 2>, check_group_avx512<M, 3>,
                      check_group_avx512<M, 4>>(xs, k, b, n, max_value, bound32, lanes);
}

// fold_block_batch with sixteen values per step (four 256-bit sums).
__attribute__((target("avx2"))) void fold_block_avx2(const float* const* xs, int k, int64_t at, int64_t len,
                                                     double* acc, const double* a) {
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m256d s0 = _mm256_loadu_pd(acc + i), s1 = _mm256_loadu_pd(acc + i + 4);
    __m256d s2 = _mm256_loadu_pd(acc + i + 8), s3 = _mm256_loadu_pd(acc + i + 12);
    for (int j = 0; j < k; ++j) {
      const float* x = xs[j] + at + i;
      const __m256d aj = _mm256_broadcast_sd(a + j);
      s0 = _mm256_add_pd(s0, _mm256_mul_pd(aj, _mm256_cvtps_pd(_mm_loadu_ps(x))));
      s1 = _mm256_add_pd(s1, _mm256_mul_pd(aj, _mm256_cvtps_pd(_mm_loadu_ps(x + 4))));
      s2 = _mm256_add_pd(s2, _mm256_mul_pd(aj, _mm256_cvtps_pd(_mm_loadu_ps(x + 8))));
      s3 = _mm256_add_pd(s3, _mm256_mul_pd(aj, _mm256_cvtps_pd(_mm_loadu_ps(x + 12))));
    }
    _mm256_storeu_pd(acc + i, s0);
    _mm256_storeu_pd(acc + i + 4, s1);
    _mm256_storeu_pd(acc + i + 8, s2);
    _mm256_storeu_pd(acc + i + 12, s3);
  }
  for (; i + 4 <= len; i += 4) {
    __m256d s = _mm256_loadu_pd(acc + i);
    for (int j = 0; j < k; ++j)
      s = _mm256_add_pd(s, _mm256_mul_pd(_mm256_broadcast_sd(a + j), _mm256_cvtps_pd(_mm_loadu_ps(xs[j] + at + i))));
    _mm256_storeu_pd(acc + i, s);
  }
  fold_tail(xs, k, at, i, len, acc, a);
}

// fold_block_batch with thirty-two values per step (four 512-bit sums).
__attribute__((target("avx512f"))) void fold_block_avx512(const float* const* xs, int k, int64_t at, int64_t len,
                                                         double* acc, const double* a) {
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m512d s0 = _mm512_loadu_pd(acc + i), s1 = _mm512_loadu_pd(acc + i + 8);
    __m512d s2 = _mm512_loadu_pd(acc + i + 16), s3 = _mm512_loadu_pd(acc + i + 24);
    for (int j = 0; j < k; ++j) {
      const float* x = xs[j] + at + i;
      const __m512d aj = _mm512_set1_pd(a[j]);
      s0 = _mm512_add_pd(s0, _mm512_mul_pd(aj, _mm512_cvtps_pd(_mm256_loadu_ps(x))));
      s1 = _mm512_add_pd(s1, _mm512_mul_pd(aj, _mm512_cvtps_pd(_mm256_loadu_ps(x + 8))));
      s2 = _mm512_add_pd(s2, _mm512_mul_pd(aj, _mm512_cvtps_pd(_mm256_loadu_ps(x + 16))));
      s3 = _mm512_add_pd(s3, _mm512_mul_pd(aj, _mm512_cvtps_pd(_mm256_loadu_ps(x + 24))));
    }
    _mm512_storeu_pd(acc + i, s0);
    _mm512_storeu_pd(acc + i + 8, s1);
    _mm512_storeu_pd(acc + i + 16, s2);
    _mm512_storeu_pd(acc + i + 24, s3);
  }
  for (; i + 8 <= len; i += 8) {
    __m512d s = _mm512_loadu_pd(acc + i);
    for (int j = 0; j < k; ++j)
      s = _mm512_add_pd(s, _mm512_mul_pd(_mm512_set1_pd(a[j]), _mm512_cvtps_pd(_mm256_loadu_ps(xs[j] + at + i))));
    _mm512_storeu_pd(acc + i, s);
  }
  fold_tail(xs, k, at, i, len, acc, a);
}
#endif  // __x86_64__

// Every update's block checked with `isa` (lanes of update j at lanes + 4j); false when any value fails.
bool check_blocks(FoldIsa isa, const float* const* xs, int k, const float* b, bool is_delta, int64_t n,
                  double max_value, double* lanes) {
#if defined(__x86_64__)
  if (isa != FoldIsa::kSse2) {
    const float bound32 = bound_f32(max_value);
    const bool wide = isa == FoldIsa::kAvx512;
    if (is_delta) return (wide ? check_avx512<kDelta> : check_avx2<kDelta>)(xs, k, b, n, max_value, bound32, lanes);
    if (b) return (wide ? check_avx512<kMinusBase> : check_avx2<kMinusBase>)(xs, k, b, n, max_value, bound32, lanes);
    return (wide ? check_avx512<kPlain> : check_avx2<kPlain>)(xs, k, b, n, max_value, bound32, lanes);
  }
#endif
  (void)isa;
  for (int j = 0; j < k; ++j)
    if (!check_block(xs[j], b, is_delta, n, max_value, lanes + 4 * j)) return false;
  return true;
}

void fold_blocks(FoldIsa isa, const float* const* xs, int k, int64_t at, int64_t len, double* acc, const double* a) {
#if defined(__x86_64__)
  if (isa == FoldIsa::kAvx512) return fold_block_avx512(xs, k, at, len, acc, a);
  if (isa == FoldIsa::kAvx2) return fold_block_avx2(xs, k, at, len, acc, a);
#endif
  (void)isa;
  fold_block_batch(xs, k, at, len, acc, a);
}

void mean_f32_sse2(const double* sums, int64_t n, double inv, float* y) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128d f = _mm_set1_pd(inv);
  for (; i + 4 <= n; i += 4) {
    const __m128 lo = _mm_cvtpd_ps(_mm_mul_pd(_mm_loadu_pd(sums + i), f));
    const __m128 hi = _mm_cvtpd_ps(_mm_mul_pd(_mm_loadu_pd(sums + i + 2), f));
    _mm_storeu_ps(y + i, _mm_movelh_ps(lo, hi));
  }
#endif
  for (; i < n; ++i) y[i] = static_cast<float>(sums[i] * inv);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) void mean_f32_avx2(const double* sums, int64_t n, double inv, float* y) {
  const __m256d f = _mm256_set1_pd(inv);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_loadu_pd(sums + i), f));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_loadu_pd(sums + i + 4), f));
    _mm256_storeu_ps(y + i, _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1));
  }
  for (; i < n; ++i) y[i] = static_cast<float>(sums[i] * inv);
}

__attribute__((target("avx512f"))) void mean_f32_avx512(const double* sums, int64_t n, double inv, float* y) {
  const __m512d f = _mm512_set1_pd(inv);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_loadu_pd(sums + i), f));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_loadu_pd(sums + i + 8), f));
    _mm512_storeu_ps(y + i, _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                                                                 _mm256_castps_pd(hi), 1)));
  }
  for (; i < n; ++i) y[i] = static_cast<float>(sums[i] * inv);
}
#endif

FoldIsa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return FoldIsa::kAvx512;
  if (__builtin_cpu_supports("avx2")) return FoldIsa::kAvx2;
#endif
  return FoldIsa::kSse2;
}

}  // namespace

FoldIsa fold_best_isa() {
  static const FoldIsa best = detect_isa();
  return best;
}

bool fold_isa_supported(FoldIsa isa) {
  return static_cast<int>(isa) >= 0 && static_cast<int>(isa) <= static_cast<int>(fold_best_isa());
}

const char* fold_isa_name(FoldIsa isa) {
  switch (isa) {
    case FoldIsa::kAvx512: return "avx512";
    case FoldIsa::kAvx2: return "avx2";
    default: return "sse2";
  }
}

void fold_mean_f32(const double* sums, int64_t n, double inv, float* y, FoldIsa isa) {
#if defined(__x86_64__)
  if (isa == FoldIsa::kAvx512) return mean_f32_avx512(sums, n, inv, y);
  if (isa == FoldIsa::kAvx2) return mean_f32_avx2(sums, n, inv, y);
#endif
  (void)isa;
  mean_f32_sse2(sums, n, inv, y);
}

int64_t fold_checked_batch(const float* const* xs, int k, const float* b, bool is_delta, int64_t n, double* sums,
                           const double* a, double max_value, double* lanes, FoldIsa isa) {
  const float* block[kFoldBatchMax];
  for (int64_t at = 0; at < n; at += kFoldBlock) {
    const int64_t len = n - at < kFoldBlock ? n - at : kFoldBlock;
    // Each update checks its block into its own lanes; a block that fails leaves every update's block unfolded.
    for (int j = 0; j < k; ++j) block[j] = xs[j] + at;
    if (!check_blocks(isa, block, k, b ? b + at : nullptr, is_delta, len, max_value, lanes)) return at;
    fold_blocks(isa, xs, k, at, len, sums + at, a);
  }
  return n;
}

int64_t fold_checked(const float* x, const float* b, bool is_delta, int64_t n, double* sums, double a,
                     double max_value, double* lanes, FoldIsa isa) {
  // The lanes change only when the whole update passed.
  double s[4] = {lanes[0], lanes[1], lanes[2], lanes[3]};
  const float* const xs[1] = {x};
  for (int64_t at = 0; at < n; at += kFoldBlock) {
    const int64_t len = n - at < kFoldBlock ? n - at : kFoldBlock;
    const float* const block[1] = {x + at};
    if (!check_blocks(isa, block, 1, b ? b + at : nullptr, is_delta, len, max_value, s)) return at;
    fold_blocks(isa, xs, 1, at, len, sums + at, &a);
  }
  lanes[0] = s[0];
  lanes[1] = s[1];
  lanes[2] = s[2];
  lanes[3] = s[3];
  return n;
}

}  // namespace medfl
