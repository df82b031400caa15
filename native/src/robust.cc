// See robust.h. Columns are reduced a tile at a time. For up to kNetworkMax rows a sorting network (Batcher's
// odd-even merge sort, comparators past n dropped: as if the missing rows held +inf; for the median only the
// comparators the middle rows depend on) sorts every column of the tile at once, each comparator a min/max over two
// contiguous rows, which the compiler turns into vector code (AVX2 where the CPU has it, chosen at load time; SSE
// otherwise). More rows than that: std::nth_element and a sort of the kept values per column. Either way the result
// is that of sorting each column, so every path and the JS twin agree exactly.
//
// Two tile layouts. When every row has the same scale and coef (no clipping, all weights or all deltas: the usual
// round), v = s·(x − c·b) is a non-decreasing function of x for s > 0, so sorting the stored float32 values sorts
// the v's: the tile stays float32 (twice the lanes per vector, half the bytes) and only the rows the statistic
// reads are turned into float64. Otherwise the tile holds the v's in float64.
#include "robust.h"

// Values must equal the JS twin's bit for bit: no a*b+c contracted into a fused multiply-add (on CPUs that have one).
#pragma GCC optimize("fp-contract=off")

#include <omp.h>

#include <algorithm>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace medfl {
namespace {

constexpr int64_t kTile = 256;
constexpr int64_t kNetworkMax = 32;

using Network = std::vector<std::pair<int, int>>;

Network odd_even_merge_network(int n) {
  Network out;
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

// The comparators that rows [lo, hi] of the sorted output depend on (walking back from the end, a comparator
// that touches a needed row makes both its inputs needed). Those rows come out exactly as a full sort leaves them.
Network needed_for(const Network& net, int n, int lo, int hi) {
  std::vector<char> need(static_cast<size_t>(n), 0);
  for (int r = lo; r <= hi; ++r) need[static_cast<size_t>(r)] = 1;
  Network keep;
  for (auto it = net.rbegin(); it != net.rend(); ++it) {
    if (need[static_cast<size_t>(it->first)] || need[static_cast<size_t>(it->second)]) {
      keep.push_back(*it);
      need[static_cast<size_t>(it->first)] = need[static_cast<size_t>(it->second)] = 1;
    }
  }
  std::reverse(keep.begin(), keep.end());
  return keep;
}

// Per column j: x[j], y[j] = min, max of the two. The pair keeps both values (for equal ones each row keeps one
// of them), so every column stays a permutation of its values. min/max instructions return "the second operand
// unless the first is less (greater)", exactly the scalar tail's selects; left to itself GCC turns those selects
// into a branchy swap, so the vector loops are written out: SSE (in every x86-64 baseline) and AVX2, chosen once
// per process from the CPU's flags (the build's baseline stays x86-64-v2, so the addon still loads without AVX2).
#if defined(__SSE2__)
inline void cx_sse(float* __restrict x, float* __restrict y, int64_t w, int64_t& j) {
  for (; j + 4 <= w; j += 4) {
    const __m128 u = _mm_loadu_ps(x + j), v = _mm_loadu_ps(y + j);
    _mm_storeu_ps(x + j, _mm_min_ps(v, u));
    _mm_storeu_ps(y + j, _mm_max_ps(u, v));
  }
}
inline void cx_sse(double* __restrict x, double* __restrict y, int64_t w, int64_t& j) {
  for (; j + 2 <= w; j += 2) {
    const __m128d u = _mm_loadu_pd(x + j), v = _mm_loadu_pd(y + j);
    _mm_storeu_pd(x + j, _mm_min_pd(v, u));
    _mm_storeu_pd(y + j, _mm_max_pd(u, v));
  }
}
__attribute__((target("avx2"))) void cx_avx2(float* __restrict x, float* __restrict y, int64_t w, int64_t& j) {
  for (; j + 8 <= w; j += 8) {
    const __m256 u = _mm256_loadu_ps(x + j), v = _mm256_loadu_ps(y + j);
    _mm256_storeu_ps(x + j, _mm256_min_ps(v, u));
    _mm256_storeu_ps(y + j, _mm256_max_ps(u, v));
  }
}
__attribute__((target("avx2"))) void cx_avx2(double* __restrict x, double* __restrict y, int64_t w, int64_t& j) {
  for (; j + 4 <= w; j += 4) {
    const __m256d u = _mm256_loadu_pd(x + j), v = _mm256_loadu_pd(y + j);
    _mm256_storeu_pd(x + j, _mm256_min_pd(v, u));
    _mm256_storeu_pd(y + j, _mm256_max_pd(u, v));
  }
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

template <typename T>
void compare_exchange_rows(T* t, const std::pair<int, int>* net, int64_t count, int64_t w) {
  for (int64_t c = 0; c < count; ++c) {
    T* __restrict x = t + net[c].first * kTile;
    T* __restrict y = t + net[c].second * kTile;
    int64_t j = 0;
#if defined(__SSE2__)
    if (kHasAvx2)
      cx_avx2(x, y, w, j);
    else
      cx_sse(x, y, w, j);
#endif
    for (; j < w; ++j) {
      const T u = x[j], v = y[j];
      x[j] = v < u ? v : u;
      y[j] = u > v ? u : v;
    }
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

// acc[j] = the statistic of the tile's sorted columns, rows in increasing order; value(i, j) gives row i's v.
template <typename Value>
void statistic_rows(int64_t n, int64_t trim, int64_t w, double* acc, Value value) {
  if (trim < 0) {
    const int64_t m = n / 2;
    if (n % 2)
      for (int64_t j = 0; j < w; ++j) acc[j] = value(m, j);
    else
      for (int64_t j = 0; j < w; ++j) acc[j] = (value(m - 1, j) + value(m, j)) / 2;
    return;
  }
  std::fill(acc, acc + w, 0.0);
  for (int64_t i = trim; i < n - trim; ++i)
    for (int64_t j = 0; j < w; ++j) acc[j] += value(i, j);
  const double kept = static_cast<double>(n - 2 * trim);
  for (int64_t j = 0; j < w; ++j) acc[j] /= kept;
}

bool same_rows(int64_t n, const double* scale, const double* coef) {
  const double s = scale[0], c = coef[0];
  if (!(s > 0) || s - s != 0 || c - c != 0) return false;  // positive and finite, or the map is not monotone
  for (int64_t i = 1; i < n; ++i)
    if (scale[i] != s || coef[i] != c) return false;
  return true;
}

}  // namespace

void robust_columns(const float* rows, int64_t n, int64_t ld, int64_t len, const float* base, const double* scale,
                    const double* coef, int64_t trim, float* out) {
  const bool network = n <= kNetworkMax;
  const bool same = network && same_rows(n, scale, coef);
  Network net;
  if (network) {
    net = odd_even_merge_network(static_cast<int>(n));
    // The median reads one or two middle rows; a trimmed mean every kept row (summed in order).
    const int lo = static_cast<int>(trim < 0 ? (n - 1) / 2 : trim), hi = static_cast<int>(trim < 0 ? n / 2 : n - 1 - trim);
    net = needed_for(net, static_cast<int>(n), lo, hi);
  }
  const int64_t tiles = (len + kTile - 1) / kTile;
  const int nt = len * n < (1 << 16) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
  {
    std::vector<double> t(static_cast<size_t>(same ? 0 : n * kTile));
    std::vector<float> tf(static_cast<size_t>(same ? n * kTile : 0));
    std::vector<double> col(static_cast<size_t>(n));
    std::vector<double> sum(static_cast<size_t>(kTile));
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t j0 = tile * kTile;
      const int64_t w = std::min(kTile, len - j0);
      const float* b = base + j0;
      double* acc = sum.data();
      if (same) {
        for (int64_t i = 0; i < n; ++i) std::copy(rows + i * ld + j0, rows + i * ld + j0 + w, tf.data() + i * kTile);
        compare_exchange_rows(tf.data(), net.data(), static_cast<int64_t>(net.size()), w);
        const double s = scale[0], c = coef[0];
        const float* f = tf.data();
        // The same float64 operations, in the same order, as the JS twin (no fused multiply-add here).
        statistic_rows(n, trim, w, acc, [&](int64_t i, int64_t j) {
          const double shifted = static_cast<double>(f[i * kTile + j]) - c * static_cast<double>(b[j]);
          return s * shifted;
        });
        for (int64_t j = 0; j < w; ++j) out[j0 + j] = static_cast<float>(static_cast<double>(b[j]) + acc[j]);
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const float* r = rows + i * ld + j0;
        double* ti = t.data() + i * kTile;
        const double s = scale[i], c = coef[i];
        for (int64_t j = 0; j < w; ++j) {
          const double shifted = static_cast<double>(r[j]) - c * static_cast<double>(b[j]);
          ti[j] = s * shifted;
        }
      }
      if (network) {
        compare_exchange_rows(t.data(), net.data(), static_cast<int64_t>(net.size()), w);
        const double* d = t.data();
        statistic_rows(n, trim, w, acc, [&](int64_t i, int64_t j) { return d[i * kTile + j]; });
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
