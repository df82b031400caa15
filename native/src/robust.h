// Coordinate-wise median and trimmed mean of a block of stacked updates (the coordinator's robust combiners).
// Semantics and the JS twin: coordinator/aggregation/robust.ts.
#pragma once

#include <cstdint>

namespace medfl {

// rows: n float32 rows of `ld` values (row i at rows + i*ld), of which the first `len` are used; base [len].
// Per column j the values v_i = scale[i] * (rows[i][j] - coef[i] * base[j]) (float64) are reduced: trim < 0 gives
// the median (the mean of the two middle values for even n), trim = k >= 0 the mean of the values left after
// dropping the k smallest and the k largest, summed in increasing order. out[j] = float(base[j] + that).
void robust_columns(const float* rows, int64_t n, int64_t ld, int64_t len, const float* base, const double* scale,
                    const double* coef, int64_t trim, float* out);

}  // namespace medfl
