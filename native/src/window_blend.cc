// See window_blend.h. Per window and output slice z: the two coarse slices around z are interpolated once (D), then
// per output row the two coarse rows around y (H), then the row is widened (W) — the JS twin's axis order, so only
// float rounding differs — and its probabilities go straight into the volume's row. Nothing window-sized is
// materialised: a thread's scratch is one coarse slice and two rows.
#include "window_blend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace medfl {
namespace {

constexpr int64_t kParallelMin = 1 << 15;

// exp in float, written so that GCC vectorises the loops that call it (glibc's expf would keep them scalar):
// Cody–Waite range reduction by ln 2 and Cephes' degree-6 polynomial, about 1 ulp on the clamped range.
inline float exp_vec(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Source indices and weights of linear upsampling by f along an axis of `in` coarse values (align_corners=False).
struct Taps {
  std::vector<int32_t> i0, i1;
  std::vector<float> t;
  Taps(int64_t in, int64_t f) : i0(in * f), i1(in * f), t(in * f) {
    for (int64_t o = 0; o < in * f; ++o) {
      const double src = std::max(0.0, (o + 0.5) / static_cast<double>(f) - 0.5);
      i0[o] = static_cast<int32_t>(std::min<int64_t>(in - 1, static_cast<int64_t>(std::floor(src))));
      i1[o] = std::min<int32_t>(static_cast<int32_t>(in - 1), i0[o] + 1);
      t[o] = static_cast<float>(src - i0[o]);
    }
  }
};

}  // namespace

void window_blend(const float* logits, const int32_t* starts, const WindowBlendGeom& g, const float* weight, float* acc,
                  float* wsum) {
  const int64_t C = g.C, f = g.f;
  const bool two = C == 2;
  const int64_t K = two ? 1 : C;  // channels carried through the upsampling: l1 − l0 for two classes
  const int64_t ld = g.wd / f, lh = g.wh / f, lw = g.ww / f;
  const int64_t coarse = ld * lh * lw;
  const Taps tz(ld, f), ty(lh, f), tx(lw, f);
  // Coarse values per window in channel-major planes [K][ld·lh·lw], so every interpolation loop runs over one channel.
  std::vector<float> planes(static_cast<size_t>(K * coarse));
  const int64_t voxels_per_window = g.wd * g.wh * g.ww;
  const int nt = voxels_per_window * K < kParallelMin ? 1 : omp_get_max_threads();
  for (int64_t b = 0; b < g.n; ++b) {
    const float* lb = logits + b * coarse * C;
    if (two) {
      for (int64_t v = 0; v < coarse; ++v) planes[v] = lb[2 * v + 1] - lb[2 * v];
    } else {
      for (int64_t v = 0; v < coarse; ++v)
        for (int64_t c = 0; c < K; ++c) planes[c * coarse + v] = lb[v * C + c];
    }
    const int64_t z0 = starts[3 * b], y0 = starts[3 * b + 1], x0 = starts[3 * b + 2];
    const int64_t z_len = std::min(g.wd, g.D - z0), y_len = std::min(g.wh, g.H - y0), x_len = std::min(g.ww, g.W - x0);
#pragma omp parallel num_threads(nt)
    {
      std::vector<float> slice(static_cast<size_t>(K * lh * lw));
      std::vector<float> row(static_cast<size_t>(K * lw));
      std::vector<float> up(static_cast<size_t>(K * g.ww));
      std::vector<float> p(static_cast<size_t>(K * g.ww));
#pragma omp for schedule(static)
      for (int64_t z = 0; z < z_len; ++z) {
        const int64_t a0 = tz.i0[z] * lh * lw, a1 = tz.i1[z] * lh * lw;
        const float t = tz.t[z], s = 1.0f - t;
        for (int64_t c = 0; c < K; ++c) {
          const float* pl = planes.data() + c * coarse;
          float* sl = slice.data() + c * lh * lw;
#pragma omp simd
          for (int64_t i = 0; i < lh * lw; ++i) sl[i] = pl[a0 + i] * s + pl[a1 + i] * t;
        }
        for (int64_t y = 0; y < y_len; ++y) {
          const int64_t r0 = ty.i0[y] * lw, r1 = ty.i1[y] * lw;
          const float u = ty.t[y], v = 1.0f - u;
          for (int64_t c = 0; c < K; ++c) {
            const float* sl = slice.data() + c * lh * lw;
            float* rw = row.data() + c * lw;
            for (int64_t i = 0; i < lw; ++i) rw[i] = sl[r0 + i] * v + sl[r1 + i] * u;
            float* out = up.data() + c * g.ww;
            for (int64_t x = 0; x < x_len; ++x) out[x] = rw[tx.i0[x]] * (1.0f - tx.t[x]) + rw[tx.i1[x]] * tx.t[x];
          }
          const float* wrow = weight + (z * g.wh + y) * g.ww;
          const int64_t vrow = ((z0 + z) * g.H + y0 + y) * g.W + x0;
          float* ws = wsum + vrow;
#pragma omp simd
          for (int64_t x = 0; x < x_len; ++x) ws[x] += wrow[x];
          if (two) {
            float* ac = acc + vrow;
            const float* d = up.data();
#pragma omp simd
            for (int64_t x = 0; x < x_len; ++x) {
              const float p1 = 1.0f / (1.0f + exp_vec(-d[x]));
              ac[x] = static_cast<float>(static_cast<double>(ac[x]) + static_cast<double>(wrow[x]) * p1);
            }
          } else {
            // Softmax over the channel planes of the row, vectorised along x.
            float* mx = p.data();  // the row's maximum, then the sum, kept in the first plane of p until the end
            std::vector<float>& e = up;
#pragma omp simd
            for (int64_t x = 0; x < x_len; ++x) mx[x] = e[x];
            for (int64_t c = 1; c < K; ++c) {
              const float* ec = e.data() + c * g.ww;
#pragma omp simd
              for (int64_t x = 0; x < x_len; ++x) mx[x] = std::max(mx[x], ec[x]);
            }
            for (int64_t c = 0; c < K; ++c) {
              float* ec = e.data() + c * g.ww;
#pragma omp simd
              for (int64_t x = 0; x < x_len; ++x) ec[x] = exp_vec(ec[x] - mx[x]);
            }
            float* se = p.data();
#pragma omp simd
            for (int64_t x = 0; x < x_len; ++x) se[x] = e[x];
            for (int64_t c = 1; c < K; ++c) {
              const float* ec = e.data() + c * g.ww;
#pragma omp simd
              for (int64_t x = 0; x < x_len; ++x) se[x] += ec[x];
            }
            float* ac = acc + vrow * C;
            for (int64_t x = 0; x < x_len; ++x) {
              const float scale = wrow[x] / se[x];
              for (int64_t c = 0; c < C; ++c) ac[x * C + c] += scale * e[c * g.ww + x];
            }
          }
        }
      }
    }
  }
}

void window_normalise(const float* acc, const float* wsum, int64_t voxels, int64_t C, float* out) {
  const int nt = voxels * C < kParallelMin ? 1 : omp_get_max_threads();
  if (C == 2) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t v = 0; v < voxels; ++v) {
      const double p1 = static_cast<double>(acc[v]) / static_cast<double>(wsum[v]);
      out[2 * v] = static_cast<float>(1.0 - p1);
      out[2 * v + 1] = static_cast<float>(p1);
    }
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t v = 0; v < voxels; ++v)
    for (int64_t c = 0; c < C; ++c) out[v * C + c] = static_cast<float>(static_cast<double>(acc[v * C + c]) / static_cast<double>(wsum[v]));
}

}  // namespace medfl
