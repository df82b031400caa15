// See elementwise.h. Built with -O3 -march=native (the addon is compiled on the machine that runs it), so
// the channel loops below become AVX2/AVX-512 code; -fopenmp for the thread split.
#include "elementwise.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace medfl {
namespace {

// Below this many values one thread is faster than waking the others.
constexpr int64_t kParallelMin = 1 << 15;

int threads_for(int64_t values) { return values < kParallelMin ? 1 : omp_get_max_threads(); }

// Rows [begin, end) of `rows` for thread t of nt.
inline void split(int64_t rows, int t, int nt, int64_t* begin, int64_t* end) {
  *begin = rows * t / nt;
  *end = rows * (t + 1) / nt;
}

}  // namespace

void bn_stats(const float* x, int64_t nv, int64_t C, double momentum, double eps, float* mean, float* invstd,
              float* run_mean, float* run_var) {
  const int nt = threads_for(nv * C);
  // Shifted sums (K = the first voxel) so the variance does not cancel when |mean| >> std.
  std::vector<float> K(x, x + C);
  std::vector<double> s1(static_cast<size_t>(nt * C), 0.0), s2(static_cast<size_t>(nt * C), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    split(nv, t, omp_get_num_threads(), &b, &e);
    double* a1 = s1.data() + t * C;
    double* a2 = s2.data() + t * C;
    const float* k = K.data();
    // Float partial sums over short runs of voxels, flushed into float64: vectorises well and loses
    // nothing that matters (32 terms of one channel).
    std::vector<float> p1(C), p2(C);
    for (int64_t i0 = b; i0 < e; i0 += 32) {
      const int64_t i1 = std::min(e, i0 + 32);
      std::fill(p1.begin(), p1.end(), 0.f);
      std::fill(p2.begin(), p2.end(), 0.f);
      float* q1 = p1.data();
      float* q2 = p2.data();
      for (int64_t i = i0; i < i1; ++i) {
        const float* xi = x + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const float d = xi[c] - k[c];
          q1[c] += d;
          q2[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        a1[c] += q1[c];
        a2[c] += q2[c];
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    double t1 = 0, t2 = 0;
    for (int t = 0; t < nt; ++t) {
      t1 += s1[t * C + c];
      t2 += s2[t * C + c];
    }
    const double m1 = t1 / nv;
    const double sq = std::max(t2 - t1 * m1, 0.0);
    const double mu = K[c] + m1;
    const double biased = sq / nv;
    mean[c] = static_cast<float>(mu);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(biased + eps));
    run_mean[c] = static_cast<float>((1 - momentum) * run_mean[c] + momentum * mu);
    run_var[c] = static_cast<float>((1 - momentum) * run_var[c] + momentum * (nv > 1 ? sq / (nv - 1) : biased));
  }
}

void scale_shift(const float* x, int64_t nv, int64_t C, const float* scale, const float* shift, bool relu, float* y) {
  const int nt = threads_for(nv * C);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < nv; ++i) {
    const float* xi = x + i * C;
    float* yi = y + i * C;
    if (relu) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const float v = xi[c] * scale[c] + shift[c];
        yi[c] = v < 0.f ? 0.f : v;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) yi[c] = xi[c] * scale[c] + shift[c];
    }
  }
}

void bn_backward(const float* x, const float* dy, int64_t nv, int64_t C, const float* mean, const float* invstd,
                 const float* gamma, const float* y, bool batch_stats, float* dgamma, float* dbeta, float* dx) {
  const int nt = threads_for(nv * C);
  std::vector<double> s1(static_cast<size_t>(nt * C), 0.0), s2(static_cast<size_t>(nt * C), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t b, e;
    split(nv, t, omp_get_num_threads(), &b, &e);
    double* a1 = s1.data() + t * C;
    double* a2 = s2.data() + t * C;
    std::vector<float> p1(C), p2(C);
    for (int64_t i0 = b; i0 < e; i0 += 32) {
      const int64_t i1 = std::min(e, i0 + 32);
      std::fill(p1.begin(), p1.end(), 0.f);
      std::fill(p2.begin(), p2.end(), 0.f);
      float* q1 = p1.data();
      float* q2 = p2.data();
      for (int64_t i = i0; i < i1; ++i) {
        const float* xi = x + i * C;
        const float* gi = dy + i * C;
        if (y) {
          const float* yi = y + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float g = yi[c] > 0.f ? gi[c] : 0.f;
            q1[c] += g;
            q2[c] += g * (xi[c] - mean[c]);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            q1[c] += gi[c];
            q2[c] += gi[c] * (xi[c] - mean[c]);
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        a1[c] += q1[c];
        a2[c] += q2[c];
      }
    }
  }
  std::vector<float> A(C), B(C, 0.f), Kc(C, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    double sum_dy = 0, sum_dyxc = 0;
    for (int t = 0; t < nt; ++t) {
      sum_dy += s1[t * C + c];
      sum_dyxc += s2[t * C + c];
    }
    dgamma[c] = static_cast<float>(sum_dyxc * invstd[c]);
    dbeta[c] = static_cast<float>(sum_dy);
    const double gi = static_cast<double>(gamma[c]) * invstd[c];
    A[c] = static_cast<float>(gi);
    if (batch_stats) {
      // dx = gi * (g - mean(g) - xhat * mean(g * xhat)) = A g + B (x - mean) + K
      const double cm = sum_dyxc / nv * invstd[c] * invstd[c];
      B[c] = static_cast<float>(-gi * cm);
      Kc[c] = static_cast<float>(-gi * sum_dy / nv);
    }
  }
  if (!dx) return;
  const float* a = A.data();
  const float* bb = B.data();
  const float* k = Kc.data();
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < nv; ++i) {
    const float* xi = x + i * C;
    const float* gi = dy + i * C;
    float* di = dx + i * C;
    if (y) {
      const float* yi = y + i * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) di[c] = (yi[c] > 0.f ? a[c] * gi[c] : 0.f) + bb[c] * (xi[c] - mean[c]) + k[c];
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) di[c] = a[c] * gi[c] + bb[c] * (xi[c] - mean[c]) + k[c];
    }
  }
}

void relu(const float* x, int64_t n, float* y) {
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] < 0.f ? 0.f : x[i];
}

void relu_backward(const float* y, const float* dy, int64_t n, float* dx) {
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
  for (int64_t i = 0; i < n; ++i) dx[i] = y[i] > 0.f ? dy[i] : 0.f;
}

void add(const float* a, const float* b, int64_t n, bool relu, float* y) {
  if (relu) {
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float v = a[i] + b[i];
      y[i] = v < 0.f ? 0.f : v;
    }
  } else {
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
  }
}

void add_into(float* dst, const float* src, int64_t n) {
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

void max_pool(const float* x, int64_t n, int64_t D, int64_t H, int64_t W, int64_t C, float* y, int32_t* argmax) {
  const int64_t oD = (D - 1) / 2 + 1, oH = (H - 1) / 2 + 1, oW = (W - 1) / 2 + 1;
  const int nt = threads_for(n * D * H * W * C);
  // One output row (n, oz, oy) per iteration; within an output voxel the taps run in (z, y, x) order and
  // a tap replaces the maximum only when strictly greater (or the first NaN): PyTorch's first maximum.
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t oz = 0; oz < oD; ++oz) {
      const int64_t z0 = std::max<int64_t>(0, 2 * oz - 1), z1 = std::min<int64_t>(D, 2 * oz + 2);
      for (int64_t oy = 0; oy < oH; ++oy) {
        const int64_t y0 = std::max<int64_t>(0, 2 * oy - 1), y1 = std::min<int64_t>(H, 2 * oy + 2);
        for (int64_t ox = 0; ox < oW; ++ox) {
          const int64_t x0 = std::max<int64_t>(0, 2 * ox - 1), x1 = std::min<int64_t>(W, 2 * ox + 2);
          const int64_t o = (((b * oD + oz) * oH + oy) * oW + ox) * C;
          float* m = y + o;
          int32_t* am = argmax + o;
          {
            const int64_t src = (((b * D + z0) * H + y0) * W + x0) * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              m[c] = x[src + c];
              am[c] = static_cast<int32_t>(src + c);
            }
          }
          for (int64_t z = z0; z < z1; ++z) {
            for (int64_t yy = y0; yy < y1; ++yy) {
              for (int64_t xx = x0; xx < x1; ++xx) {
                if (z == z0 && yy == y0 && xx == x0) continue;
                const int64_t src = (((b * D + z) * H + yy) * W + xx) * C;
                const float* xs = x + src;
                const int32_t base = static_cast<int32_t>(src);
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                  const float v = xs[c];
                  const float cur = m[c];
                  const bool take = v > cur || (v != v && cur == cur);
                  m[c] = take ? v : cur;
                  am[c] = take ? base + static_cast<int32_t>(c) : am[c];
                }
              }
            }
          }
        }
      }
    }
  }
}

void max_pool_backward(const float* dy, const int32_t* argmax, int64_t n, int64_t D, int64_t H, int64_t W, int64_t C,
                       float* dx) {
  const int64_t oD = (D - 1) / 2 + 1, oH = (H - 1) / 2 + 1, oW = (W - 1) / 2 + 1;
  const int nt = threads_for(n * D * H * W * C);
  // A gather, not a scatter: each input voxel sums dy over the (1 to 8) outputs whose window holds it and
  // whose argmax names it, in output order (the order a serial scatter would add them in). Every dx value
  // is written once, so threads never share one and dx needs no zeroing; argmax is only compared.
  const auto first = [](int64_t i) { return i / 2; };                  // first output whose window holds i:
  const auto last = [](int64_t i, int64_t o) { return std::min<int64_t>((i + 1) / 2, o - 1); };  // window 2o-1 .. 2o+1
#pragma omp parallel for num_threads(nt) schedule(static) collapse(2)
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t z = 0; z < D; ++z) {
      const int64_t oz0 = first(z), oz1 = last(z, oD);
      for (int64_t yy = 0; yy < H; ++yy) {
        const int64_t oy0 = first(yy), oy1 = last(yy, oH);
        for (int64_t xx = 0; xx < W; ++xx) {
          const int64_t ox0 = first(xx), ox1 = last(xx, oW);
          const int64_t in = (((b * D + z) * H + yy) * W + xx) * C;
          float* d = dx + in;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) d[c] = 0.f;
          const int32_t base = static_cast<int32_t>(in);
          for (int64_t oz = oz0; oz <= oz1; ++oz)
            for (int64_t oy = oy0; oy <= oy1; ++oy)
              for (int64_t ox = ox0; ox <= ox1; ++ox) {
                const int64_t o = (((b * oD + oz) * oH + oy) * oW + ox) * C;
                const int32_t* am = argmax + o;
                const float* g = dy + o;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) d[c] += am[c] == base + static_cast<int32_t>(c) ? g[c] : 0.f;
              }
        }
      }
    }
  }
}

void adam_step(float* w, const float* g, float* m, float* v, int64_t n, double step_size, double beta1, double beta2,
               double eps, double sqrt_c2, double wd) {
  const float b1 = float(beta1), b2 = float(beta2), c1 = float(1 - beta1), c2 = float(1 - beta2);
  const float ss = float(step_size), e = float(eps), inv_sc2 = float(1 / sqrt_c2), fwd = float(wd);
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] + fwd * w[i];
    const float mi = b1 * m[i] + c1 * gi;
    const float vi = b2 * v[i] + c2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] -= ss * mi / (std::sqrt(vi) * inv_sc2 + e);
  }
}

void sgd_step(float* w, const float* g, float* buf, int64_t n, double lr, double momentum, double wd, bool first) {
  const float l = float(lr), mo = float(momentum), fwd = float(wd);
  const bool use_buf = momentum > 0;
#pragma omp parallel for simd num_threads(threads_for(n)) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] + fwd * w[i];
    const float b = first ? gi : mo * buf[i] + gi;
    buf[i] = b;
    w[i] -= l * (use_buf ? b : gi);
  }
}

}  // namespace medfl
