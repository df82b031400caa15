// See fold.h. The check loop mirrors delta_sq_lanes (norm.cc) and adds the bound test; the fold loop is the
// coordinator's float64 axpy (sums + a * x, one rounding each for the product and the sum).
#include "fold.h"

#include <cmath>

// Values must equal the JS twin's bit for bit: no a*b+c contracted into a fused multiply-add.
#pragma GCC optimize("fp-contract=off")

namespace medfl {

namespace {

// True when every proposed weight of the block is finite and within ±max_value; adds the block's squares to the
// lanes (only meaningful when it returns true). `tail` is set for the last block of the update: its n mod 4
// values go to lane 0 after the others, as the JS loop does.
bool check_block(const float* x, const float* b, bool is_delta, int64_t n, double max_value, double* s) {
  const int64_t n4 = n - n % 4;
  bool ok = true;
  int64_t i = 0;
  if (b && !is_delta) {
    for (; i < n4; i += 4) {
      const double x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      const double a0 = x0 - b[i], a1 = x1 - b[i + 1], a2 = x2 - b[i + 2], a3 = x3 - b[i + 3];
      s[0] += a0 * a0;
      s[1] += a1 * a1;
      s[2] += a2 * a2;
      s[3] += a3 * a3;
      // NaN compares false: !(|v| <= bound) catches it with the infinities and the too-large values.
      ok &= (std::fabs(x0) <= max_value) & (std::fabs(x1) <= max_value) & (std::fabs(x2) <= max_value) &
            (std::fabs(x3) <= max_value);
    }
    for (; i < n; ++i) {
      const double xi = x[i], ai = xi - b[i];
      s[0] += ai * ai;
      ok &= std::fabs(xi) <= max_value;
    }
  } else {
    for (; i < n4; i += 4) {
      const double x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
      s[0] += x0 * x0;
      s[1] += x1 * x1;
      s[2] += x2 * x2;
      s[3] += x3 * x3;
      if (is_delta) {
        ok &= (std::fabs(b[i] + x0) <= max_value) & (std::fabs(b[i + 1] + x1) <= max_value) &
              (std::fabs(b[i + 2] + x2) <= max_value) & (std::fabs(b[i + 3] + x3) <= max_value);
      } else {
        ok &= (std::fabs(x0) <= max_value) & (std::fabs(x1) <= max_value) & (std::fabs(x2) <= max_value) &
              (std::fabs(x3) <= max_value);
      }
    }
    for (; i < n; ++i) {
      const double xi = x[i];
      s[0] += xi * xi;
      ok &= std::fabs(is_delta ? b[i] + xi : xi) <= max_value;
    }
  }
  return ok;
}

}  // namespace

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
