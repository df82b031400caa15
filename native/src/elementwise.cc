// See elementwise.h. Built with -O3 for a portable x86-64-v2 baseline (native/binding.gyp), so the loops
// below become SSE4 vector code; -fopenmp for the thread split.
#include "elementwise.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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
            const float gv = gi[c];  // loaded unconditionally: GCC does not vectorise a conditional load
            const float g = yi[c] > 0.f ? gv : 0.f;
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
      for (int64_t c = 0; c < C; ++c) {
        const float ag = a[c] * gi[c];  // unconditionally: a conditional multiply is not if-converted
        di[c] = (yi[c] > 0.f ? ag : 0.f) + bb[c] * (xi[c] - mean[c]) + k[c];
      }
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
  for (int64_t i = 0; i < n; ++i) {
    const float d = dy[i];  // loaded unconditionally, so the loop vectorises
    dx[i] = y[i] > 0.f ? d : 0.f;
  }
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
                for (int64_t c = 0; c < C; ++c) {
                  const float gv = g[c];  // loaded unconditionally, so the loop vectorises
                  d[c] += am[c] == base + static_cast<int32_t>(c) ? gv : 0.f;
                }
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

// ---- GroupNorm, channel concatenation, bias (the U-Net head's memory-bound ops) ----

namespace medfl {
namespace {

// Voxels per tile: channel loops of C values are too short to vectorise well when C is 8 or 16, so the
// per-channel loops below run over tiles of k whole voxels (k·C ≥ 64 values) with per-channel vectors
// repeated k times: one fixed-length inner loop the compiler turns into full vectors.
inline int64_t tile_voxels(int64_t C) { return std::max<int64_t>(1, 64 / C); }

// `row` (C values) repeated k times.
std::vector<float> tiled(const float* row, int64_t C, int64_t k) {
  std::vector<float> t(static_cast<size_t>(C * k));
  for (int64_t j = 0; j < k; ++j) std::copy(row, row + C, t.begin() + j * C);
  return t;
}

// Adds the per-value float partials p[T] (T = k·C) into per-channel doubles acc[C] and clears p.
inline void flush(float* p, int64_t T, int64_t C, double* acc) {
  for (int64_t i = 0; i < T; ++i) {
    acc[i % C] += p[i];
    p[i] = 0.f;
  }
}

// Rows [r0, r1) of thread t in `rows` rows, cut into pieces that stay inside one sample of V rows:
// calls f(sample, first row, end row) for each piece.
template <typename F>
void for_sample_pieces(int64_t r0, int64_t r1, int64_t V, F&& f) {
  while (r0 < r1) {
    const int64_t b = r0 / V;
    const int64_t e = std::min(r1, (b + 1) * V);
    f(b, r0, e);
    r0 = e;
  }
}

// Per-channel sums of (x - shift) and (x - shift)^2 over voxels [v0, v1) of x [., C]: float partials over
// 32-tile runs flushed into double (as bn_stats).
void shifted_sums(const float* x, int64_t v0, int64_t v1, int64_t C, const float* shift_t, double* a1, double* a2) {
  const int64_t k = tile_voxels(C), T = k * C;
  std::vector<float> p1(static_cast<size_t>(T), 0.f), p2(static_cast<size_t>(T), 0.f);
  float* q1 = p1.data();
  float* q2 = p2.data();
  int64_t v = v0;
  while (v + k <= v1) {
    const int64_t tiles = std::min<int64_t>(32, (v1 - v) / k);
    for (int64_t t = 0; t < tiles; ++t, v += k) {
      const float* xi = x + v * C;
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) {
        const float d = xi[i] - shift_t[i];
        q1[i] += d;
        q2[i] += d * d;
      }
    }
    flush(q1, T, C, a1);
    flush(q2, T, C, a2);
  }
  for (; v < v1; ++v) {
    const float* xi = x + v * C;
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(xi[c]) - shift_t[c];
      a1[c] += d;
      a2[c] += d * d;
    }
  }
}

// y = (x - M) * A + B per channel (then max(., 0)) over voxels [v0, v1); M_t (nullable: 0), A_t, B_t tiled.
// Centring first keeps the result exact to float rounding of y when |mean| >> std.
void affine_rows(const float* x, int64_t v0, int64_t v1, int64_t C, const float* M_t, const float* A_t, const float* B_t, bool relu,
                 float* y) {
  const int64_t k = tile_voxels(C), T = k * C;
  std::vector<float> zero;
  if (!M_t) {
    zero.assign(static_cast<size_t>(T), 0.f);
    M_t = zero.data();
  }
  int64_t v = v0;
  for (; v + k <= v1; v += k) {
    const float* xi = x + v * C;
    float* yi = y + v * C;
    if (relu) {
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) {
        const float t = (xi[i] - M_t[i]) * A_t[i] + B_t[i];
        yi[i] = t > 0.f ? t : 0.f;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) yi[i] = (xi[i] - M_t[i]) * A_t[i] + B_t[i];
    }
  }
  for (; v < v1; ++v) {
    for (int64_t c = 0; c < C; ++c) {
      const float t = (x[v * C + c] - M_t[c]) * A_t[c] + B_t[c];
      y[v * C + c] = relu ? (t > 0.f ? t : 0.f) : t;
    }
  }
}

// Per-channel sums of x [., C] over voxels [v0, v1) added into acc[C] (float partials flushed into double).
void channel_sums(const float* x, int64_t v0, int64_t v1, int64_t C, double* acc) {
  const int64_t k = tile_voxels(C), T = k * C;
  std::vector<float> p(static_cast<size_t>(T), 0.f);
  float* q = p.data();
  int64_t v = v0;
  while (v + k <= v1) {
    const int64_t tiles = std::min<int64_t>(32, (v1 - v) / k);
    for (int64_t t = 0; t < tiles; ++t, v += k) {
      const float* xi = x + v * C;
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) q[i] += xi[i];
    }
    flush(q, T, C, acc);
  }
  for (; v < v1; ++v)
    for (int64_t c = 0; c < C; ++c) acc[c] += x[v * C + c];
}

// GroupNorm backward, first pass: per-channel Σ g and Σ g·(x − μ) over voxels [v0, v1), g = dy masked where the
// fused ReLU's output y (nullable) is not positive; added into a1, a2 [C]. m_t: μ per channel, tiled.
void gn_grad_sums(const float* x, const float* dy, const float* y, int64_t v0, int64_t v1, int64_t C, const float* m_t, double* a1,
                  double* a2) {
  const int64_t k = tile_voxels(C), T = k * C;
  std::vector<float> p1(static_cast<size_t>(T), 0.f), p2(static_cast<size_t>(T), 0.f);
  float* q1 = p1.data();
  float* q2 = p2.data();
  int64_t v = v0;
  while (v + k <= v1) {
    const int64_t tiles = std::min<int64_t>(32, (v1 - v) / k);
    for (int64_t u = 0; u < tiles; ++u, v += k) {
      const float* xi = x + v * C;
      const float* gi = dy + v * C;
      if (y) {
        const float* yi = y + v * C;
#pragma omp simd
        for (int64_t i = 0; i < T; ++i) {
          const float gv = gi[i];  // loaded unconditionally: GCC does not vectorise a conditional load
          const float g = yi[i] > 0.f ? gv : 0.f;
          q1[i] += g;
          q2[i] += g * (xi[i] - m_t[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < T; ++i) {
          q1[i] += gi[i];
          q2[i] += gi[i] * (xi[i] - m_t[i]);
        }
      }
    }
    flush(q1, T, C, a1);
    flush(q2, T, C, a2);
  }
  for (; v < v1; ++v) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = v * C + c;
      const double g = (y && !(y[i] > 0.f)) ? 0.0 : dy[i];
      a1[c] += g;
      a2[c] += g * (static_cast<double>(x[i]) - m_t[c]);
    }
  }
}

// GroupNorm backward, second pass: dx = g·p + (x − μ)·q + r over voxels [v0, v1) (g masked as above).
void gn_dx_rows(const float* x, const float* dy, const float* y, int64_t v0, int64_t v1, int64_t C, const float* m, const float* p,
                const float* q, const float* r, float* dx) {
  const int64_t k = tile_voxels(C), T = k * C;
  int64_t v = v0;
  for (; v + k <= v1; v += k) {
    const float* xi = x + v * C;
    const float* gi = dy + v * C;
    float* di = dx + v * C;
    if (y) {
      const float* yi = y + v * C;
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) {
        const float gp = gi[i] * p[i];  // unconditionally: a conditional multiply is not if-converted
        di[i] = (yi[i] > 0.f ? gp : 0.f) + (xi[i] - m[i]) * q[i] + r[i];
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < T; ++i) di[i] = gi[i] * p[i] + (xi[i] - m[i]) * q[i] + r[i];
    }
  }
  for (; v < v1; ++v) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = v * C + c;
      const float g = (y && !(y[i] > 0.f)) ? 0.f : dy[i] * p[c];
      dx[i] = g + (x[i] - m[c]) * q[c] + r[c];
    }
  }
}

}  // namespace

void group_norm_forward(const float* x, int64_t n, int64_t V, int64_t C, int64_t G, const float* gamma, const float* beta,
                        double eps, bool relu, float* y, double* mean, double* invstd) {
  const int64_t cg = C / G, rows = n * V, k = tile_voxels(C);
  const int nt = threads_for(rows * C);
  // Shift per (sample, channel): the sample's first voxel, so the sums do not cancel when |mean| >> std.
  std::vector<std::vector<float>> shift(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) shift[b] = tiled(x + b * V * C, C, k);
  std::vector<double> s1(static_cast<size_t>(nt * n * C), 0.0), s2(static_cast<size_t>(nt * n * C), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t r0, r1;
    split(rows, t, omp_get_num_threads(), &r0, &r1);
    for_sample_pieces(r0, r1, V, [&](int64_t b, int64_t v0, int64_t v1) {
      shifted_sums(x, v0, v1, C, shift[b].data(), s1.data() + (t * n + b) * C, s2.data() + (t * n + b) * C);
    });
  }
  // Per group: mean from Σ(x - K_c) + V·K_c, and Σ(x - μ)² = Σ_c [S2_c + 2(K_c - μ)S1_c + V(K_c - μ)²].
  std::vector<float> Mc(static_cast<size_t>(n * C)), A(static_cast<size_t>(n * C)), B(static_cast<size_t>(n * C));
  const double M = static_cast<double>(V * cg);
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0;
      std::vector<double> S1(static_cast<size_t>(cg)), S2(static_cast<size_t>(cg));
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t c = g * cg + j;
        double t1 = 0, t2 = 0;
        for (int t = 0; t < nt; ++t) {
          t1 += s1[(t * n + b) * C + c];
          t2 += s2[(t * n + b) * C + c];
        }
        S1[j] = t1;
        S2[j] = t2;
        sum += t1 + V * static_cast<double>(shift[b][c]);
      }
      const double mu = sum / M;
      double sq = 0;
      for (int64_t j = 0; j < cg; ++j) {
        const double d = shift[b][g * cg + j] - mu;
        sq += S2[j] + 2 * d * S1[j] + V * d * d;
      }
      const double is = 1.0 / std::sqrt(std::max(sq, 0.0) / M + eps);
      mean[b * G + g] = mu;
      invstd[b * G + g] = is;
      const float mu_f = static_cast<float>(mu);
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t c = g * cg + j;
        const double a = gamma[c] * is;
        Mc[b * C + c] = mu_f;
        A[b * C + c] = static_cast<float>(a);
        B[b * C + c] = static_cast<float>(beta[c] + (mu_f - mu) * a);
      }
    }
  }
  std::vector<std::vector<float>> Mt(static_cast<size_t>(n)), At(static_cast<size_t>(n)), Bt(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    Mt[b] = tiled(Mc.data() + b * C, C, k);
    At[b] = tiled(A.data() + b * C, C, k);
    Bt[b] = tiled(B.data() + b * C, C, k);
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    split(rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    for_sample_pieces(r0, r1, V, [&](int64_t b, int64_t v0, int64_t v1) { affine_rows(x, v0, v1, C, Mt[b].data(), At[b].data(), Bt[b].data(), relu, y); });
  }
}

void group_norm_backward(const float* x, const float* dy, int64_t n, int64_t V, int64_t C, int64_t G, const double* mean,
                         const double* invstd, const float* gamma, const float* y, double* dgamma, double* dbeta, float* dx) {
  const int64_t cg = C / G, rows = n * V, k = tile_voxels(C);
  const int nt = threads_for(rows * C);
  // Per (sample, channel) the group mean, tiled, to centre x in the sums (Σ g·(x − μ) keeps its precision).
  std::vector<std::vector<float>> mu_t(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    std::vector<float> row(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) row[c] = static_cast<float>(mean[b * G + c / cg]);
    mu_t[b] = tiled(row.data(), C, k);
  }
  std::vector<double> s1(static_cast<size_t>(nt * n * C), 0.0), s2(static_cast<size_t>(nt * n * C), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t r0, r1;
    split(rows, t, omp_get_num_threads(), &r0, &r1);
    for_sample_pieces(r0, r1, V, [&](int64_t b, int64_t v0, int64_t v1) {
      gn_grad_sums(x, dy, y, v0, v1, C, mu_t[b].data(), s1.data() + (t * n + b) * C, s2.data() + (t * n + b) * C);
    });
  }
  // dx = g·p + (x − μ)·q + r per (sample, channel), with p = sγ, q = −s²·S2/M, r = −s·S1/M per group, where
  // S1 = Σ γ·g and S2 = Σ γ·g·x̂ over the group (the same algebra as the JS kernel, centred on μ).
  std::vector<float> P(static_cast<size_t>(n * C)), Q(static_cast<size_t>(n * C)), R(static_cast<size_t>(n * C));
  const double M = static_cast<double>(V * cg);
  for (int64_t b = 0; b < n; ++b) {
    std::vector<double> gs1(static_cast<size_t>(G), 0.0), gs2(static_cast<size_t>(G), 0.0);
    for (int64_t c = 0; c < C; ++c) {
      double sd = 0, sdxc = 0;
      for (int t = 0; t < nt; ++t) {
        sd += s1[(t * n + b) * C + c];
        sdxc += s2[(t * n + b) * C + c];
      }
      const int64_t g = c / cg;
      const double s = invstd[b * G + g];
      // Σ g·x̂ with x̂ = (x − μ)·s, centred on the float μ the sums used.
      const double mu_f = static_cast<float>(mean[b * G + g]);
      const double dyxhat = s * (sdxc + (mu_f - mean[b * G + g]) * sd);
      dbeta[c] += sd;
      dgamma[c] += dyxhat;
      gs1[g] += gamma[c] * sd;
      gs2[g] += gamma[c] * dyxhat;
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = c / cg;
      const double s = invstd[b * G + g];
      P[b * C + c] = static_cast<float>(s * gamma[c]);
      Q[b * C + c] = static_cast<float>(-s * s * gs2[g] / M);
      R[b * C + c] = static_cast<float>(-s * gs1[g] / M);
    }
  }
  if (!dx) return;
  std::vector<std::vector<float>> Pt(static_cast<size_t>(n)), Qt(static_cast<size_t>(n)), Rt(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    Pt[b] = tiled(P.data() + b * C, C, k);
    Qt[b] = tiled(Q.data() + b * C, C, k);
    Rt[b] = tiled(R.data() + b * C, C, k);
  }
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    split(rows, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
    for_sample_pieces(r0, r1, V, [&](int64_t b, int64_t v0, int64_t v1) {
      gn_dx_rows(x, dy, y, v0, v1, C, mu_t[b].data(), Pt[b].data(), Qt[b].data(), Rt[b].data(), dx);
    });
  }
}

namespace {

// Copies n floats; the common channel counts get compile-time sizes (a few vector moves instead of a loop
// with a runtime trip count per voxel, which made the concatenation 2-3x slower than a plain copy).
template <int N>
inline void copy_fixed(float* d, const float* s) {
  std::memcpy(d, s, N * sizeof(float));
}
inline void copy_channels(float* d, const float* s, int64_t n) {
  switch (n) {
    case 8: return copy_fixed<8>(d, s);
    case 16: return copy_fixed<16>(d, s);
    case 32: return copy_fixed<32>(d, s);
    case 64: return copy_fixed<64>(d, s);
    default: std::memcpy(d, s, static_cast<size_t>(n) * sizeof(float));
  }
}

}  // namespace

void concat_channels(const float* a, int64_t Ca, const float* b, int64_t Cb, int64_t nv, float* y) {
  const int64_t C = Ca + Cb;
#pragma omp parallel for num_threads(threads_for(nv * C)) schedule(static)
  for (int64_t v = 0; v < nv; ++v) {
    copy_channels(y + v * C, a + v * Ca, Ca);
    copy_channels(y + v * C + Ca, b + v * Cb, Cb);
  }
}

void split_channels(const float* y, int64_t Ca, int64_t Cb, int64_t nv, float* a, float* b) {
  const int64_t C = Ca + Cb;
#pragma omp parallel for num_threads(threads_for(nv * C)) schedule(static)
  for (int64_t v = 0; v < nv; ++v) {
    if (a) copy_channels(a + v * Ca, y + v * C, Ca);
    if (b) copy_channels(b + v * Cb, y + v * C + Ca, Cb);
  }
}

void bias_add(float* y, int64_t nv, int64_t C, const float* bias) {
  const int64_t k = tile_voxels(C);
  const std::vector<float> ones(static_cast<size_t>(k * C), 1.f);
  const std::vector<float> bt = tiled(bias, C, k);
#pragma omp parallel num_threads(threads_for(nv * C))
  {
    int64_t v0, v1;
    split(nv, omp_get_thread_num(), omp_get_num_threads(), &v0, &v1);
    affine_rows(y, v0, v1, C, nullptr, ones.data(), bt.data(), false, y);
  }
}

void channel_sum(const float* x, int64_t nv, int64_t C, double* sum) {
  const int nt = threads_for(nv * C);
  std::vector<double> s(static_cast<size_t>(nt * C), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t v0, v1;
    split(nv, t, omp_get_num_threads(), &v0, &v1);
    channel_sums(x, v0, v1, C, s.data() + t * C);
  }
  for (int64_t c = 0; c < C; ++c)
    for (int t = 0; t < nt; ++t) sum[c] += s[t * C + c];
}

}  // namespace medfl
