// See fold.h. The check loop mirrors delta_sq_lanes (norm.cc) and adds the bound test; the fold loop is the
// coordinator's float64 axpy (sums + a * x, one rounding each for the product and the sum).
#include "fold.h"

#include <cmath>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Values must equal the JS twin's bit for bit: no a*b+c contracted into a fused multiply-add.
#pragma GCC optimize("fp-contract=off")

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
  for (; i < len; ++i) {
    double s = acc[i];
    for (int j = 0; j < k; ++j) s += a[j] * static_cast<double>(xs[j][at + i]);
    acc[i] = s;
  }
}

}  // namespace

int64_t fold_checked_batch(const float* const* xs, int k, const float* b, bool is_delta, int64_t n, double* sums,
                           const double* a, double max_value, double* lanes) {
  for (int64_t at = 0; at < n; at += kFoldBlock) {
    const int64_t len = n - at < kFoldBlock ? n - at : kFoldBlock;
    // Each update checks its block into its own lanes; a block that fails leaves every update's block unfolded.
    for (int j = 0; j < k; ++j) {
      if (!check_block(xs[j] + at, b ? b + at : nullptr, is_delta, len, max_value, lanes + 4 * j)) return at;
    }
    fold_block_batch(xs, k, at, len, sums + at, a);
  }
  return n;
}

int64_t fold_checked(const float* x, const float* b, bool is_delta, int64_t n, double* sums, double a,
                     double max_value, double* lanes) {
  double s[4] = {lanes[0], lanes[1], lanes[2], lanes[3]};
  for (int64_t at = 0; at < n; at += kFoldBlock) {
    const int64_t len = n - at < kFoldBlock ? n - at : kFoldBlock;
    if (!check_block(x + at, b ? b + at : nullptr, is_delta, len, max_value, s)) return at;
    double* acc = sums + at;
    const float* xs = x + at;
    for (int64_t i = 0; i < len; ++i) acc[i] += a * static_cast<double>(xs[i]);
  }
  lanes[0] = s[0];
  lanes[1] = s[1];
  lanes[2] = s[2];
  lanes[3] = s[3];
  return n;
}

}  // namespace medfl
