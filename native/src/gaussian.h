// Standard normal samples from uniform 32-bit words (the DP noise of the coordinator's close). The words come from
// the caller's CSPRNG; this only transforms them. Semantics and the JS twin: coordinator/aggregation/gaussian.ts.
#pragma once

#include <cstddef>
#include <cstdint>

namespace medfl {

// Box–Muller, two words per pair of samples: u1 = (w[2k] + 1) / (2^32 + 1) in (0, 1), u2 = w[2k+1] / 2^32,
// r = sqrt(−2 ln u1), out[2k] = r cos(2π u2), out[2k+1] = r sin(2π u2), in float64, rounded to float32 once.
// words holds n + n % 2 values (an odd n uses the last pair's cosine only).
void gaussian_from_words(const uint32_t* words, size_t n, float* out);

}  // namespace medfl
