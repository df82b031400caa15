// The coordinator's checked fold: one pass over an update that both checks it (every proposed weight finite and
// within ±max_value, the delta's squared L2 norm in four float64 lanes) and folds it into the float64 sums.
// Semantics and the JS twin: coordinator/aggregation/checked-fold.ts.
#pragma once

#include <cstdint>

namespace medfl {

// Works block by block (kFoldBlock floats, a multiple of four): a block is first checked while it is read into
// cache, then folded (sums[i] += a * x[i]) from cache, so the update is read from memory once. A block holding a
// non-finite value or a weight beyond ±max_value is not folded, and the function returns its start: every
// element before it was folded, nothing at or after it was. Returns n when all of it was folded.
// Proposed weight: x[i], or b[i] + x[i] when is_delta (b is then required). Norm operand: x[i] when is_delta or
// b is null, else x[i] - b[i]. The lanes are added to in delta_sq_lanes' order (norm.h), bit for bit.
int64_t fold_checked(const float* x, const float* b, bool is_delta, int64_t n, double* sums, double a,
                     double max_value, double* lanes);

constexpr int64_t kFoldBlock = 8192;

}  // namespace medfl
