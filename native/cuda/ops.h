// Device operations of the "cuda" ComputeDevice (ops.cu); bound to JS in addon.cc. Pointers are device memory.
#pragma once

#include <cstdint>
#include <string>

namespace medfl_cuda {

// Convolution geometry as shared/engine/cuda-device.ts packs it (21 int32):
// n, in[3], cin, cout, k[3], stride[3], dilation[3], padBefore[3], out[3].
struct Geom {
  static constexpr int kLen = 21;
  int raw[kLen];
  int n() const { return raw[0]; }
  int in(int i) const { return raw[1 + i]; }
  int cin() const { return raw[4]; }
  int cout() const { return raw[5]; }
  int k(int i) const { return raw[6 + i]; }
  int stride(int i) const { return raw[9 + i]; }
  int dilation(int i) const { return raw[12 + i]; }
  int pad(int i) const { return raw[15 + i]; }
  int out(int i) const { return raw[18 + i]; }
};

void set_tf32(bool on);
std::string cudnn_version();

// op 0: y = conv(x = a, w = b); 1: dx = conv backward-data(dy = a, w = b); 2: dw (DHWIO) += backward-filter(x = a, dy = b).
void conv(int op, const Geom& g, const float* a, const float* b, float* out);

void bn_train(const float* x, int64_t nv, int C, const float* gamma, const float* beta, float* runMean, float* runVar, float momentum, float eps, bool relu,
              float* y, float* mean, float* invStd);
void bn_eval(const float* x, int64_t nv, int C, const float* gamma, const float* beta, const float* runMean, const float* runVar, float eps, bool relu, float* y,
             float* mean, float* invStd);
void bn_backward(const float* x, const float* dy, int64_t nv, int C, const float* mean, const float* invStd, const float* gamma, const float* y, bool batchStats,
                 float* dx, float* gg, float* gb);
void gn_forward(const float* x, int n, int64_t V, int C, int G, const float* gamma, const float* beta, float eps, bool relu, float* y, double* stats);
void gn_backward(const float* x, const float* dy, int n, int64_t V, int C, int G, const double* stats, const float* gamma, const float* reluOut, float* dx, float* gg,
                 float* gb);

void fill(float* p, int64_t n, float v);
void copy(float* dst, const float* src, int64_t n);
void relu(const float* x, float* y, int64_t n);
void relu_backward(const float* y, const float* dy, float* dx, int64_t n);
void add(const float* a, const float* b, float* y, int64_t n, bool relu);
void add_into(float* dst, const float* src, int64_t n);
void max_pool(const float* x, int n, int D, int H, int W, int C, float* y, int* argmax);
void max_pool_backward(const float* dy, const int* argmax, int n, int D, int H, int W, int C, float* dx);
void concat(const float* a, int Ca, const float* b, int Cb, float* y, int64_t voxels);
void split(const float* y, int Ca, int Cb, float* a, float* b, int64_t voxels);
void bias_add(float* y, int64_t voxels, int C, const float* bias);
void bias_grad_add(float* gb, const float* dy, int64_t voxels, int C);
void shortcut_a(const float* x, int n, int D, int H, int W, int C, int outC, int stride, float* y);
void shortcut_a_backward(const float* dy, int n, int D, int H, int W, int C, int outC, int stride, float* dx);
void segmentation_loss(const float* z, const float* target, const float* weight, int64_t voxels, int K, double smooth, float* loss, float* grad);
void adam(float* w, const float* g, float* m, float* v, int64_t n, double stepSize, double b1, double b2, double eps, double sqrtC2, double wd);
void sgd(float* w, const float* g, float* buf, int64_t n, double lr, double momentum, double wd, bool first);

}  // namespace medfl_cuda
