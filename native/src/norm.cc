// See norm.h. The loop reads the update and the base straight from the JS arrays (no copies into other memory);
// the four lanes are two float64 vectors of two, which the compiler keeps in registers.
#include "norm.h"

// Values must equal the JS twin's bit for bit: no a*b+c contracted into a fused multiply-add.
#pragma GCC optimize("fp-contract=off")

namespace medfl {

void delta_sq_lanes(const float* x, const float* b, int64_t n, double* lanes) {
  double s0 = lanes[0], s1 = lanes[1], s2 = lanes[2], s3 = lanes[3];
  const int64_t n4 = n - n % 4;
  int64_t i = 0;
  if (b) {
    for (; i < n4; i += 4) {
      const double a0 = static_cast<double>(x[i]) - b[i], a1 = static_cast<double>(x[i + 1]) - b[i + 1];
      const double a2 = static_cast<double>(x[i + 2]) - b[i + 2], a3 = static_cast<double>(x[i + 3]) - b[i + 3];
      s0 += a0 * a0;
      s1 += a1 * a1;
      s2 += a2 * a2;
      s3 += a3 * a3;
    }
    for (; i < n; ++i) {
      const double a = static_cast<double>(x[i]) - b[i];
      s0 += a * a;
    }
  } else {
    for (; i < n4; i += 4) {
      const double a0 = x[i], a1 = x[i + 1], a2 = x[i + 2], a3 = x[i + 3];
      s0 += a0 * a0;
      s1 += a1 * a1;
      s2 += a2 * a2;
      s3 += a3 * a3;
    }
    for (; i < n; ++i) {
      const double a = x[i];
      s0 += a * a;
    }
  }
  lanes[0] = s0;
  lanes[1] = s1;
  lanes[2] = s2;
  lanes[3] = s3;
}

}  // namespace medfl
