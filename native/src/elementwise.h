// Memory-bound training ops on NDHWC float32 tensors (channels innermost): BatchNorm (train statistics,
// scale/shift, backward), ReLU, add, max-pool 3^3 / stride 2 / padding 1 with argmax. Plain loops the
// compiler vectorises over the channel axis, split over OpenMP threads; reductions are per thread in
// float64 and summed in thread order. Semantics: shared/engine/elementwise-kernels.ts; the norm layers'
// (BatchNorm, GroupNorm) in shared/model/layers/, which look these functions up by their exported name.
#pragma once

#include <cstddef>
#include <cstdint>

namespace medfl {

// Batch mean and 1/sqrt(biased var + eps) per channel, and the running estimates moved by `momentum`
// (unbiased variance), of x [nv, C].
void bn_stats(const float* x, int64_t nv, int64_t C, double momentum, double eps, float* mean, float* invstd,
              float* run_mean, float* run_var);
// y = x * scale + shift per channel, then max(y, 0) when relu.
void scale_shift(const float* x, int64_t nv, int64_t C, const float* scale, const float* shift, bool relu, float* y);
// BatchNorm backward; y (nullable) masks dy where y <= 0. dx nullable (not wanted).
void bn_backward(const float* x, const float* dy, int64_t nv, int64_t C, const float* mean, const float* invstd,
                 const float* gamma, const float* y, bool batch_stats, float* dgamma, float* dbeta, float* dx);
void relu(const float* x, int64_t n, float* y);
void relu_backward(const float* y, const float* dy, int64_t n, float* dx);
void add(const float* a, const float* b, int64_t n, bool relu, float* y);
void add_into(float* dst, const float* src, int64_t n);
// x [n, D, H, W, C] -> y, argmax [n, oD, oH, oW, C], o = floor((s - 1) / 2) + 1.
void max_pool(const float* x, int64_t n, int64_t D, int64_t H, int64_t W, int64_t C, float* y, int32_t* argmax);
// dx [n, D, H, W, C] = the sum of dy over the outputs whose argmax is that value (every value written).
void max_pool_backward(const float* dy, const int32_t* argmax, int64_t n, int64_t D, int64_t H, int64_t W, int64_t C,
                       float* dx);

// GroupNorm over x [n, V, C] with G groups of C/G consecutive channels (nn.GroupNorm): per (sample, group)
// mean and 1/sqrt(biased var + eps) into mean, invstd [n*G] (double), y = normalised * gamma + beta, then
// max(y, 0) when relu.
void group_norm_forward(const float* x, int64_t n, int64_t V, int64_t C, int64_t G, const float* gamma, const float* beta,
                        double eps, bool relu, float* y, double* mean, double* invstd);
// Its gradients: dgamma, dbeta [C] (double) are ADDED to; dx (nullable) written completely. y (nullable): the
// forward output when it fused a ReLU, which masks dy where y <= 0.
void group_norm_backward(const float* x, const float* dy, int64_t n, int64_t V, int64_t C, int64_t G, const double* mean,
                         const double* invstd, const float* gamma, const float* y, double* dgamma, double* dbeta, float* dx);
// y [nv, Ca + Cb] = a [nv, Ca] and b [nv, Cb] side by side; split_channels is its inverse (a, b nullable).
void concat_channels(const float* a, int64_t Ca, const float* b, int64_t Cb, int64_t nv, float* y);
void split_channels(const float* y, int64_t Ca, int64_t Cb, int64_t nv, float* a, float* b);
// y [nv, C] += bias per channel; sum[c] += sum over voxels of x[., c] (double accumulation).
void bias_add(float* y, int64_t nv, int64_t C, const float* bias);
void channel_sum(const float* x, int64_t nv, int64_t C, double* sum);

// One optimiser step over a tensor, PyTorch's rules (shared/model/optim.ts holds the JS twin and the semantics):
// Adam: g' = g + wd*w; m = b1*m + (1-b1)*g'; v = b2*v + (1-b2)*g'^2; w -= step_size*m / (sqrt(v)/sqrt_c2 + eps).
void adam_step(float* w, const float* g, float* m, float* v, int64_t n, double step_size, double beta1, double beta2,
               double eps, double sqrt_c2, double wd);
// SGD with momentum: b = first ? g' : momentum*b + g'; w -= lr*(momentum > 0 ? b : g').
void sgd_step(float* w, const float* g, float* buf, int64_t n, double lr, double momentum, double wd, bool first);

}  // namespace medfl
