// The squared L2 norm of an update's delta (the coordinator's check), in the JS twin's exact order: four
// interleaved float64 lanes. Semantics and the twin: coordinator/aggregation/validate.ts (deltaNorm).
#pragma once

#include <cstdint>

namespace medfl {

// lanes[k] += sum over i = k mod 4 of (x[i] - b[i])^2 in float64 (b nullable: x[i]^2), the n mod 4 values past the
// last whole group of four added to lanes[0] after the others, as the JS loop does. One thread, so the order of
// every addition is fixed and the result equals the JS one bit for bit.
void delta_sq_lanes(const float* x, const float* b, int64_t n, double* lanes);

}  // namespace medfl
