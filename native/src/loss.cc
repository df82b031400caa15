// See loss.h. Two passes over the logits: the softmax (kept in `grad`) with the cross-entropy and the per-class
// Dice sums, then the gradient in place. Sums are per thread in float64, added in thread order, so a result does
// not depend on scheduling.
#include "loss.h"

#include <omp.h>

#include <cmath>
#include <vector>

namespace medfl {
namespace {

constexpr int64_t kParallelMin = 1 << 15;

inline void rows_of(int64_t rows, int t, int nt, int64_t* begin, int64_t* end) {
  *begin = rows * t / nt;
  *end = rows * (t + 1) / nt;
}

// Softmax of rows [v0, v1) into p, and the weighted sums: acc[0] = cross-entropy, then inter, psum, gsum [C] each.
void softmax_sums(const float* z, const float* target, const float* weight, int64_t v0, int64_t v1, int64_t C, float* p,
                  double* acc) {
  double ce = 0;
  double* inter = acc + 1;
  double* psum = inter + C;
  double* gsum = psum + C;
  for (int64_t v = v0; v < v1; ++v) {
    const float* zv = z + v * C;
    const float* gv = target + v * C;
    float* pv = p + v * C;
    const double wv = weight ? weight[v] : 1.0;
    float max = zv[0];
    for (int64_t c = 1; c < C; ++c) max = zv[c] > max ? zv[c] : max;
    // Single-precision exp and log (the probabilities are floats anyway): one exp per class and one log per voxel,
    // p = e / Σe rather than a second exp; sums stay in float64.
    float se = 0;
    for (int64_t c = 0; c < C; ++c) se += pv[c] = std::exp(zv[c] - max);
    const float inv = 1.0f / se;
    const double log_se = std::log(se);
    for (int64_t c = 0; c < C; ++c) {
      const double pc = pv[c] *= inv;
      const double g = gv[c];
      if (g != 0) ce -= wv * g * (static_cast<double>(zv[c] - max) - log_se);
      inter[c] += wv * pc * g;
      psum[c] += wv * pc;
      gsum[c] += wv * g;
    }
  }
  acc[0] += ce;
}

// grad = w · (p·(a − Σ p·a) + ce_scale·(p − g)) with a_c = coef_a[c]·g_c + coef_b[c], in place over p.
void loss_grad(const float* target, const float* weight, int64_t v0, int64_t v1, int64_t C, const double* coef_a,
               const double* coef_b, double ce_scale, float* grad) {
  for (int64_t v = v0; v < v1; ++v) {
    const float* gv = target + v * C;
    float* pv = grad + v * C;
    double dot = 0;
    for (int64_t c = 0; c < C; ++c) dot += pv[c] * (coef_a[c] * gv[c] + coef_b[c]);
    const double wv = weight ? weight[v] : 1.0;
    for (int64_t c = 0; c < C; ++c) {
      const double pc = pv[c];
      const double a = coef_a[c] * gv[c] + coef_b[c];
      pv[c] = static_cast<float>(wv * (pc * (a - dot) + ce_scale * (pc - gv[c])));
    }
  }
}

}  // namespace

double segmentation_loss(const float* z, const float* target, const float* weight, int64_t nv, int64_t C, double smooth,
                         float* grad) {
  const int nt = nv * C < kParallelMin ? 1 : omp_get_max_threads();
  const int64_t A = 1 + 3 * C;
  std::vector<double> acc(static_cast<size_t>(nt * A), 0.0);
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    int64_t v0, v1;
    rows_of(nv, t, omp_get_num_threads(), &v0, &v1);
    softmax_sums(z, target, weight, v0, v1, C, grad, acc.data() + t * A);
  }
  std::vector<double> sum(static_cast<size_t>(A), 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t i = 0; i < A; ++i) sum[i] += acc[t * A + i];
  const double ce = sum[0] / nv;
  const double* inter = sum.data() + 1;
  const double* psum = inter + C;
  const double* gsum = psum + C;
  // dL/dp for foreground class c at a voxel is coef_a[c]·g + coef_b[c] (Dice is linear in g there).
  std::vector<double> coef_a(static_cast<size_t>(C), 0.0), coef_b(static_cast<size_t>(C), 0.0);
  const double w = -0.5 / (C - 1);
  double dice_mean = 0;
  for (int64_t c = 1; c < C; ++c) {
    const double den = psum[c] + gsum[c] + smooth;
    const double num = 2 * inter[c] + smooth;
    dice_mean += num / den / (C - 1);
    coef_a[c] = w * 2 / den;
    coef_b[c] = -w * num / (den * den);
  }
  const double ce_scale = 0.5 / nv;
#pragma omp parallel num_threads(nt)
  {
    int64_t v0, v1;
    rows_of(nv, omp_get_thread_num(), omp_get_num_threads(), &v0, &v1);
    loss_grad(target, weight, v0, v1, C, coef_a.data(), coef_b.data(), ce_scale, grad);
  }
  return 0.5 * (ce + 1 - dice_mean);
}

}  // namespace medfl
