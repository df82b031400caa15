// See robust.h. Columns are reduced a tile at a time: the tile's values are laid out row by row in float64, and
// for up to kNetworkMax rows a sorting network (Batcher's odd-even merge sort, comparators past n dropped: as if
// the missing rows held +inf) sorts every column of the tile at once, each comparator a min/max over two
// contiguous rows, which the compiler turns into vector code. More rows than that: std::nth_element and a sort of
// the kept values per column. Either way the result is that of sorting each column, so both agree exactly.
#include "robust.h"

// Values must equal the JS twin's bit for bit: no a*b+c contracted into a fused multiply-add (on CPUs that have one).
#pragma GCC optimize("fp-contract=off")

#include <omp.h>

#include <algorithm>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace medfl {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kNetworkMax = 32;

std::vector<std::pair<int, int>> odd_even_merge_network(int n) {
  std::vector<std::pair<int, int>> out;
  int p2 = 1;
  while (p2 < n) p2 *= 2;
  for (int p = 1; p < p2; p *= 2) {
    for (int k = p; k >= 1; k /= 2) {
      for (int j = k % p; j + k < p2; j += 2 * k) {
        for (int i = 0; i < k && i + j + k < p2; ++i) {
          if ((i + j) / (2 * p) != (i + j + k) / (2 * p)) continue;
          const int a = i + j, b = i + j + k;
          if (b < n) out.emplace_back(a, b);
        }
      }
    }
  }
  return out;
}

// Per column j: x[j], y[j] = min, max of the two. The pair keeps both values (for equal ones each row keeps one
// of them), so every column stays a permutation of its values. SSE2 is in every x86-64 baseline; GCC does not
// if-convert the scalar select into vector code by itself.
inline void compare_exchange(double* __restrict x, double* __restrict y, int64_t w) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 2 <= w; j += 2) {
    const __m128d u = _mm_loadu_pd(x + j), v = _mm_loadu_pd(y + j);
    _mm_storeu_pd(x + j, _mm_min_pd(v, u));  // v < u ? v : u
    _mm_storeu_pd(y + j, _mm_max_pd(u, v));  // u > v ? u : v
  }
#endif
  for (; j < w; ++j) {
    const double u = x[j], v = y[j];
    x[j] = v < u ? v : u;
    y[j] = u > v ? u : v;
  }
}

inline double reduce_sorted(const double* s, int64_t n, int64_t trim) {
  if (trim < 0) {
    const int64_t m = n / 2;
    return n % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
  }
  double sum = 0;
  for (int64_t i = trim; i < n - trim; ++i) sum += s[i];
  return sum / static_cast<double>(n - 2 * trim);
}

}  // namespace

void robust_columns(const float* rows, int64_t n, int64_t ld, int64_t len, const float* base, const double* scale,
                    const double* coef, int64_t trim, float* out) {
  const bool network = n <= kNetworkMax;
  const auto net = network ? odd_even_merge_network(static_cast<int>(n)) : std::vector<std::pair<int, int>>();
  const int64_t tiles = (len + kTile - 1) / kTile;
  const int nt = len * n < (1 << 16) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> t(static_cast<size_t>(n * kTile));
    std::vector<double> col(static_cast<size_t>(n));
    std::vector<double> sum(static_cast<size_t>(kTile));
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t j0 = tile * kTile;
      const int64_t w = std::min(kTile, len - j0);
      const float* b = base + j0;
      for (int64_t i = 0; i < n; ++i) {
        const float* r = rows + i * ld + j0;
        double* ti = t.data() + i * kTile;
        const double s = scale[i], c = coef[i];
        for (int64_t j = 0; j < w; ++j) {
          // The same float64 operations, in the same order, as the JS twin (no fused multiply-add here).
          const double shifted = static_cast<double>(r[j]) - c * static_cast<double>(b[j]);
          ti[j] = s * shifted;
        }
      }
      if (network) {
        for (const auto& [a, c] : net) compare_exchange(t.data() + a * kTile, t.data() + c * kTile, w);
        // Every column sorted: the statistic row by row over the tile, rows in increasing order.
        double* acc = sum.data();
        if (trim < 0) {
          const double* hi = t.data() + (n / 2) * kTile;
          const double* lo = t.data() + (n / 2 - 1) * kTile;
          if (n % 2)
            for (int64_t j = 0; j < w; ++j) acc[j] = hi[j];
          else
            for (int64_t j = 0; j < w; ++j) acc[j] = (lo[j] + hi[j]) / 2;
        } else {
          std::fill(acc, acc + w, 0.0);
          for (int64_t i = trim; i < n - trim; ++i) {
            const double* ti = t.data() + i * kTile;
            for (int64_t j = 0; j < w; ++j) acc[j] += ti[j];
          }
          const double kept = static_cast<double>(n - 2 * trim);
          for (int64_t j = 0; j < w; ++j) acc[j] /= kept;
        }
        for (int64_t j = 0; j < w; ++j) out[j0 + j] = static_cast<float>(static_cast<double>(b[j]) + acc[j]);
      } else {
        for (int64_t j = 0; j < w; ++j) {
          for (int64_t i = 0; i < n; ++i) col[i] = t[i * kTile + j];
          double* c = col.data();
          if (trim < 0) {
            // The two middle values are all the median needs.
            const int64_t m = n / 2;
            std::nth_element(c, c + m, c + n);
            if (n % 2 == 0) std::nth_element(c, c + m - 1, c + m);
          } else {
            if (trim > 0) {
              std::nth_element(c, c + trim, c + n);
              std::nth_element(c + trim, c + n - 1 - trim, c + n);
            }
            std::sort(c + trim, c + n - trim);
          }
          out[j0 + j] = static_cast<float>(static_cast<double>(b[j]) + reduce_sorted(c, n, trim));
        }
      }
    }
  }
}

}  // namespace medfl
