// The device operations of the "cuda" ComputeDevice: cuDNN convolutions (forward, backward-data, backward-filter;
// strided and dilated) on NDHWC activations with the host engine's DHWIO weights, and the CUDA kernels of
// kernels.cuh for BatchNorm, GroupNorm, ReLU, max-pool, add, concat, shortcut A, the segmentation loss and the
// optimisers. Pointers are device pointers; every call is stream-ordered on the legacy default stream.
#include "ops.h"

#include <cudnn.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels.cuh"

namespace medfl_cuda {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}
void check(cudnnStatus_t s, const char* what) {
  if (s != CUDNN_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": " + cudnnGetErrorString(s));
}
void launched(const char* what) { check(cudaGetLastError(), what); }

constexpr cudaStream_t kStream = 0;

// ---- scratch memory that lives for one operation (stream-ordered reuse) ----
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  void* get(size_t want) {
    if (want <= bytes) return ptr;
    if (ptr) check(cudaFree(ptr), "cudaFree(scratch)");
    ptr = nullptr;
    check(cudaMalloc(&ptr, want), "cudaMalloc(scratch)");
    bytes = want;
    return ptr;
  }
};

struct ConvPlan {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  int algo = 0;
  size_t workspace = 0;
};

struct State {
  cudnnHandle_t dnn = nullptr;
  bool tf32 = false;
  Scratch reduce, aux, weightT, workspace;
  std::unordered_map<std::string, ConvPlan> plans;
};

State& state() {
  static State s;
  if (!s.dnn) check(cudnnCreate(&s.dnn), "cudnnCreate");
  return s;
}

// ---- weights: DHWIO (host layout) <-> ODHWI (cuDNN's NHWC filter format) ----
__global__ void dhwio_to_odhwi(const float* __restrict__ w, float* __restrict__ out, int S, int I, int O) {
  const int64_t n = static_cast<int64_t>(S) * I * O;
  GRID_STRIDE(idx, n) {
    const int o = static_cast<int>(idx / (static_cast<int64_t>(S) * I));
    const int rem = static_cast<int>(idx % (static_cast<int64_t>(S) * I));
    const int s = rem / I, i = rem % I;
    out[idx] = w[(static_cast<int64_t>(s) * I + i) * O + o];
  }
}
__global__ void odhwi_add_to_dhwio(const float* __restrict__ src, float* __restrict__ w, int S, int I, int O) {
  const int64_t n = static_cast<int64_t>(S) * I * O;
  GRID_STRIDE(idx, n) {
    const int s = static_cast<int>(idx / (static_cast<int64_t>(I) * O));
    const int rem = static_cast<int>(idx % (static_cast<int64_t>(I) * O));
    const int i = rem / O, o = rem % O;
    w[idx] += src[(static_cast<int64_t>(o) * S + s) * I + i];
  }
}

std::string plan_key(int op, const Geom& g, bool tf32) {
  std::string k = std::to_string(op) + (tf32 ? "t" : "f");
  for (int v : g.raw) k += "," + std::to_string(v);
  return k;
}

ConvPlan& plan_for(int op, const Geom& g) {
  State& st = state();
  const std::string key = plan_key(op, g, st.tf32);
  auto it = st.plans.find(key);
  if (it != st.plans.end()) return it->second;
  ConvPlan p;
  check(cudnnCreateTensorDescriptor(&p.x), "cudnnCreateTensorDescriptor");
  check(cudnnCreateTensorDescriptor(&p.y), "cudnnCreateTensorDescriptor");
  check(cudnnCreateFilterDescriptor(&p.w), "cudnnCreateFilterDescriptor");
  check(cudnnCreateConvolutionDescriptor(&p.conv), "cudnnCreateConvolutionDescriptor");
  const int xd[5] = {g.n(), g.cin(), g.in(0), g.in(1), g.in(2)};
  const int yd[5] = {g.n(), g.cout(), g.out(0), g.out(1), g.out(2)};
  const int wd[5] = {g.cout(), g.cin(), g.k(0), g.k(1), g.k(2)};
  check(cudnnSetTensorNdDescriptorEx(p.x, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 5, xd), "input descriptor");
  check(cudnnSetTensorNdDescriptorEx(p.y, CUDNN_TENSOR_NHWC, CUDNN_DATA_FLOAT, 5, yd), "output descriptor");
  check(cudnnSetFilterNdDescriptor(p.w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NHWC, 5, wd), "filter descriptor");
  const int pad[3] = {g.pad(0), g.pad(1), g.pad(2)};
  const int stride[3] = {g.stride(0), g.stride(1), g.stride(2)};
  const int dil[3] = {g.dilation(0), g.dilation(1), g.dilation(2)};
  check(cudnnSetConvolutionNdDescriptor(p.conv, 3, pad, stride, dil, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT), "convolution descriptor");
  // PyTorch's rule: TF32 tensor cores only when allowed (torch.backends.cudnn.allow_tf32), else plain FMA.
  const cudnnMathType_t math = st.tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
  check(cudnnSetConvolutionMathType(p.conv, math), "cudnnSetConvolutionMathType");
  int outDims[5];
  check(cudnnGetConvolutionNdForwardOutputDim(p.conv, p.x, p.w, 5, outDims), "cudnnGetConvolutionNdForwardOutputDim");
  for (int i = 0; i < 5; i++) {
    if (outDims[i] != yd[i]) throw std::runtime_error("conv geometry: cuDNN's output shape differs from MedFL's (asymmetric padding is not supported)");
  }
  // Measured choice (as torch.backends.cudnn.benchmark = True), once per geometry.
  constexpr int kMax = 16;
  int found = 0;
  bool ok = false;
  auto take = [&](auto* perf) {
    for (int i = 0; i < found; i++) {
      if (perf[i].status != CUDNN_STATUS_SUCCESS) continue;
      // Without TF32 (as PyTorch with allow_tf32 off): skip results that need tensor-op math and run the rest with
      // FMA math (cuDNN may report CUDNN_DEFAULT_MATH for them, which would allow TF32 on Ampere and later).
      const bool tensorOps = perf[i].mathType == CUDNN_TENSOR_OP_MATH || perf[i].mathType == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION;
      if (!st.tf32 && tensorOps) continue;
      p.algo = static_cast<int>(perf[i].algo);
      p.workspace = perf[i].memory;
      check(cudnnSetConvolutionMathType(p.conv, st.tf32 ? perf[i].mathType : CUDNN_FMA_MATH), "cudnnSetConvolutionMathType");
      ok = true;
      return;
    }
  };
  if (op == 0) {
    cudnnConvolutionFwdAlgoPerf_t perf[kMax];
    check(cudnnFindConvolutionForwardAlgorithm(st.dnn, p.x, p.w, p.conv, p.y, kMax, &found, perf), "cudnnFindConvolutionForwardAlgorithm");
    take(perf);
  } else if (op == 1) {
    cudnnConvolutionBwdDataAlgoPerf_t perf[kMax];
    check(cudnnFindConvolutionBackwardDataAlgorithm(st.dnn, p.w, p.y, p.conv, p.x, kMax, &found, perf), "cudnnFindConvolutionBackwardDataAlgorithm");
    take(perf);
  } else {
    cudnnConvolutionBwdFilterAlgoPerf_t perf[kMax];
    check(cudnnFindConvolutionBackwardFilterAlgorithm(st.dnn, p.x, p.y, p.conv, p.w, kMax, &found, perf), "cudnnFindConvolutionBackwardFilterAlgorithm");
    take(perf);
  }
  if (!ok) throw std::runtime_error("cuDNN has no algorithm for this convolution" + std::string(st.tf32 ? "" : " without TF32"));
  // The workspace of the algorithm under the math type actually set (it may differ from the measured one's).
  size_t ws = 0;
  if (op == 0) {
    check(cudnnGetConvolutionForwardWorkspaceSize(st.dnn, p.x, p.w, p.conv, p.y, static_cast<cudnnConvolutionFwdAlgo_t>(p.algo), &ws), "forward workspace size");
  } else if (op == 1) {
    check(cudnnGetConvolutionBackwardDataWorkspaceSize(st.dnn, p.w, p.y, p.conv, p.x, static_cast<cudnnConvolutionBwdDataAlgo_t>(p.algo), &ws),
          "backward-data workspace size");
  } else {
    check(cudnnGetConvolutionBackwardFilterWorkspaceSize(st.dnn, p.x, p.y, p.conv, p.w, static_cast<cudnnConvolutionBwdFilterAlgo_t>(p.algo), &ws),
          "backward-filter workspace size");
  }
  if (ws > p.workspace) p.workspace = ws;
  return st.plans.emplace(key, p).first->second;
}

}  // namespace

void set_tf32(bool on) { state().tf32 = on; }

std::string cudnn_version() {
  const size_t v = cudnnGetVersion();
  return std::to_string(v / 10000) + "." + std::to_string((v % 10000) / 100) + "." + std::to_string(v % 100);
}

void conv(int op, const Geom& g, const float* a, const float* b, float* out) {
  State& st = state();
  ConvPlan& p = plan_for(op, g);
  const int S = g.k(0) * g.k(1) * g.k(2), I = g.cin(), O = g.cout();
  const int64_t wlen = static_cast<int64_t>(S) * I * O;
  float* wT = static_cast<float*>(st.weightT.get(wlen * sizeof(float)));
  void* ws = p.workspace ? st.workspace.get(p.workspace) : nullptr;
  const float one = 1.f, zero = 0.f;
  if (op == 0 || op == 1) {
    dhwio_to_odhwi<<<blocks_for(wlen), 256, 0, kStream>>>(b, wT, S, I, O);
    launched("weight transpose");
    if (op == 0) {
      check(cudnnConvolutionForward(st.dnn, &one, p.x, a, p.w, wT, p.conv, static_cast<cudnnConvolutionFwdAlgo_t>(p.algo), ws, p.workspace, &zero, p.y, out),
            "cudnnConvolutionForward");
    } else {
      check(cudnnConvolutionBackwardData(st.dnn, &one, p.w, wT, p.y, a, p.conv, static_cast<cudnnConvolutionBwdDataAlgo_t>(p.algo), ws, p.workspace, &zero, p.x, out),
            "cudnnConvolutionBackwardData");
    }
    return;
  }
  // Filter gradient into ODHWI scratch, then added into the DHWIO accumulator.
  check(cudnnConvolutionBackwardFilter(st.dnn, &one, p.x, a, p.y, b, p.conv, static_cast<cudnnConvolutionBwdFilterAlgo_t>(p.algo), ws, p.workspace, &zero, p.w, wT),
        "cudnnConvolutionBackwardFilter");
  odhwi_add_to_dhwio<<<blocks_for(wlen), 256, 0, kStream>>>(wT, out, S, I, O);
  launched("filter gradient transpose");
}

// ---------------------------------------------------------------- BatchNorm
namespace {
__global__ void bn_finalize_train(const double* sums, const float* x, int C, int64_t nv, float* runMean, float* runVar, float momentum, float eps, float* mean,
                                  float* invStd) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double m1 = sums[2 * c] / nv;
  double var = sums[2 * c + 1] / nv - m1 * m1;
  if (var < 0) var = 0;
  const double mu = x[c] + m1;
  mean[c] = static_cast<float>(mu);
  invStd[c] = static_cast<float>(1.0 / sqrt(var + eps));
  const double unbiased = nv > 1 ? var * nv / (nv - 1) : var;
  runMean[c] = static_cast<float>((1.0 - momentum) * runMean[c] + momentum * mu);
  runVar[c] = static_cast<float>((1.0 - momentum) * runVar[c] + momentum * unbiased);
}
__global__ void bn_finalize_eval(const float* runMean, const float* runVar, int C, float eps, float* mean, float* invStd) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  mean[c] = runMean[c];
  invStd[c] = static_cast<float>(1.0 / sqrt(static_cast<double>(runVar[c]) + eps));
}
__global__ void bn_apply(const float* __restrict__ x, int64_t n, int C, const float* gamma, const float* beta, const float* mean, const float* invStd, bool relu,
                         float* __restrict__ y) {
  GRID_STRIDE(i, n) {
    const int c = static_cast<int>(i % C);
    const float scale = gamma[c] * invStd[c];
    const float shift = beta[c] - mean[c] * scale;
    float v = x[i] * scale + shift;
    y[i] = relu && !(v > 0.f) && v == v ? 0.f : v;
  }
}
// Per channel: dβ = Σg, dγ = Σg·x̂; coefficients of dx.
__global__ void bn_finalize_backward(const double* sums, int C, int64_t nv, const float* invStd, const float* gamma, bool batchStats, float* gg, float* gb,
                                     float* coef) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double sg = sums[2 * c], sgx = sums[2 * c + 1] * invStd[c];
  if (gb) gb[c] = static_cast<float>(gb[c] + static_cast<float>(sg));
  if (gg) gg[c] = static_cast<float>(gg[c] + static_cast<float>(sgx));
  coef[3 * c] = gamma[c] * invStd[c];
  coef[3 * c + 1] = batchStats ? static_cast<float>(sg / nv) : 0.f;
  coef[3 * c + 2] = batchStats ? static_cast<float>(sgx / nv * invStd[c]) : 0.f;
}
__global__ void bn_dx(const float* __restrict__ x, const float* __restrict__ dy, const float* y, int64_t n, int C, const float* mean, const float* coef,
                      float* __restrict__ dx) {
  GRID_STRIDE(i, n) {
    const int c = static_cast<int>(i % C);
    const float g = y && !(y[i] > 0.f) ? 0.f : dy[i];
    dx[i] = coef[3 * c] * (g - coef[3 * c + 1] - (x[i] - mean[c]) * coef[3 * c + 2]);
  }
}
}  // namespace

void bn_train(const float* x, int64_t nv, int C, const float* gamma, const float* beta, float* runMean, float* runVar, float momentum, float eps, bool relu,
              float* y, float* mean, float* invStd) {
  State& st = state();
  double* sums = static_cast<double*>(st.reduce.get(2 * C * sizeof(double)));
  check(cudaMemsetAsync(sums, 0, 2 * C * sizeof(double), kStream), "cudaMemsetAsync");
  // Sums of x − x[first voxel] per channel: the variance does not cancel when |mean| ≫ std.
  launch_channel_reduce<2>(
      1, nv, C,
      [x, C] __device__(int, int64_t v, int c, double* r) {
        const double d = static_cast<double>(x[v * C + c]) - x[c];
        r[0] = d;
        r[1] = d * d;
      },
      sums, kStream);
  launched("batchNorm statistics");
  bn_finalize_train<<<(C + 127) / 128, 128, 0, kStream>>>(sums, x, C, nv, runMean, runVar, momentum, eps, mean, invStd);
  launched("batchNorm finalize");
  bn_apply<<<blocks_for(nv * C), 256, 0, kStream>>>(x, nv * C, C, gamma, beta, mean, invStd, relu, y);
  launched("batchNorm apply");
}

void bn_eval(const float* x, int64_t nv, int C, const float* gamma, const float* beta, const float* runMean, const float* runVar, float eps, bool relu, float* y,
             float* mean, float* invStd) {
  bn_finalize_eval<<<(C + 127) / 128, 128, 0, kStream>>>(runMean, runVar, C, eps, mean, invStd);
  launched("batchNorm eval statistics");
  bn_apply<<<blocks_for(nv * C), 256, 0, kStream>>>(x, nv * C, C, gamma, beta, mean, invStd, relu, y);
  launched("batchNorm apply");
}

void bn_backward(const float* x, const float* dy, int64_t nv, int C, const float* mean, const float* invStd, const float* gamma, const float* y, bool batchStats,
                 float* dx, float* gg, float* gb) {
  State& st = state();
  double* sums = static_cast<double*>(st.reduce.get(2 * C * sizeof(double)));
  float* coef = static_cast<float*>(st.aux.get(3 * C * sizeof(float)));
  check(cudaMemsetAsync(sums, 0, 2 * C * sizeof(double), kStream), "cudaMemsetAsync");
  launch_channel_reduce<2>(
      1, nv, C,
      [x, dy, y, mean, C] __device__(int, int64_t v, int c, double* r) {
        const int64_t i = v * C + c;
        const float g = y && !(y[i] > 0.f) ? 0.f : dy[i];
        r[0] = g;
        r[1] = static_cast<double>(g) * (static_cast<double>(x[i]) - mean[c]);
      },
      sums, kStream);
  launched("batchNorm backward sums");
  bn_finalize_backward<<<(C + 127) / 128, 128, 0, kStream>>>(sums, C, nv, invStd, gamma, batchStats, gg, gb, coef);
  launched("batchNorm backward finalize");
  if (dx) {
    bn_dx<<<blocks_for(nv * C), 256, 0, kStream>>>(x, dy, y, nv * C, C, mean, coef, dx);
    launched("batchNorm dx");
  }
}

// ---------------------------------------------------------------- GroupNorm
namespace {
// stats: [n·G] means then [n·G] inverse standard deviations, double.
__global__ void gn_finalize(const double* sums, const float* x, int n, int64_t V, int C, int G, float eps, double* stats) {
  const int sg = blockIdx.x * blockDim.x + threadIdx.x;
  if (sg >= n * G) return;
  const int s = sg / G, grp = sg % G, cg = C / G;
  double sx = 0, sxx = 0;
  for (int c = grp * cg; c < (grp + 1) * cg; c++) {
    const double K = x[static_cast<int64_t>(s) * V * C + c];
    const double s1 = sums[2 * (static_cast<int64_t>(s) * C + c)], s2 = sums[2 * (static_cast<int64_t>(s) * C + c) + 1];
    sx += s1 + V * K;
    sxx += s2 + 2 * K * s1 + V * K * K;
  }
  const double M = static_cast<double>(V) * cg;
  const double mu = sx / M;
  double var = sxx / M - mu * mu;
  if (var < 0) var = 0;
  stats[sg] = mu;
  stats[n * G + sg] = 1.0 / sqrt(var + eps);
}
__global__ void gn_apply(const float* __restrict__ x, int n, int64_t V, int C, int G, const float* gamma, const float* beta, const double* stats, bool relu,
                         float* __restrict__ y) {
  const int64_t total = static_cast<int64_t>(n) * V * C;
  GRID_STRIDE(i, total) {
    const int c = static_cast<int>(i % C);
    const int s = static_cast<int>(i / (V * C));
    const int sg = s * G + c / (C / G);
    const double a = gamma[c] * stats[n * G + sg];
    const float v = static_cast<float>((x[i] - stats[sg]) * a + beta[c]);
    y[i] = relu && !(v > 0.f) && v == v ? 0.f : v;
  }
}
// Per channel: dγ, dβ over samples; per (sample, group): P = Σ γ·A / M and Q = Σ γ·B·σ⁻¹ / M of dx.
__global__ void gn_finalize_params(const double* sums, int n, int C, int G, const double* stats, float* gg, float* gb) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double dg = 0, db = 0;
  for (int s = 0; s < n; s++) {
    const int sg = s * G + c / (C / G);
    db += sums[2 * (static_cast<int64_t>(s) * C + c)];
    dg += sums[2 * (static_cast<int64_t>(s) * C + c) + 1] * stats[n * G + sg];
  }
  if (gg) gg[c] = static_cast<float>(gg[c] + dg);
  if (gb) gb[c] = static_cast<float>(gb[c] + db);
}
__global__ void gn_finalize_dx(const double* sums, int n, int64_t V, int C, int G, const double* stats, const float* gamma, double* pq) {
  const int sg = blockIdx.x * blockDim.x + threadIdx.x;
  if (sg >= n * G) return;
  const int s = sg / G, grp = sg % G, cg = C / G;
  double P = 0, Q = 0;
  for (int c = grp * cg; c < (grp + 1) * cg; c++) {
    P += gamma[c] * sums[2 * (static_cast<int64_t>(s) * C + c)];
    Q += gamma[c] * sums[2 * (static_cast<int64_t>(s) * C + c) + 1];
  }
  const double M = static_cast<double>(V) * cg;
  pq[2 * sg] = P / M;
  pq[2 * sg + 1] = Q * stats[n * G + sg] / M;
}
__global__ void gn_dx(const float* __restrict__ x, const float* __restrict__ dy, const float* reluOut, int n, int64_t V, int C, int G, const double* stats,
                      const float* gamma, const double* pq, float* __restrict__ dx) {
  const int64_t total = static_cast<int64_t>(n) * V * C;
  GRID_STRIDE(i, total) {
    const int c = static_cast<int>(i % C);
    const int s = static_cast<int>(i / (V * C));
    const int sg = s * G + c / (C / G);
    const float g = reluOut && !(reluOut[i] > 0.f) ? 0.f : dy[i];
    const double inv = stats[n * G + sg];
    dx[i] = static_cast<float>(inv * (gamma[c] * static_cast<double>(g) - pq[2 * sg] - (x[i] - stats[sg]) * inv * pq[2 * sg + 1]));
  }
}
}  // namespace

void gn_forward(const float* x, int n, int64_t V, int C, int G, const float* gamma, const float* beta, float eps, bool relu, float* y, double* stats) {
  if (G < 1 || C % G != 0) throw std::runtime_error("group norm: " + std::to_string(C) + " channels cannot be split into " + std::to_string(G) + " groups");
  State& st = state();
  const size_t bytes = 2 * static_cast<size_t>(n) * C * sizeof(double);
  double* sums = static_cast<double*>(st.reduce.get(bytes));
  check(cudaMemsetAsync(sums, 0, bytes, kStream), "cudaMemsetAsync");
  launch_channel_reduce<2>(
      n, V, C,
      [x, V, C] __device__(int s, int64_t v, int c, double* r) {
        const int64_t base = static_cast<int64_t>(s) * V * C;
        const double d = static_cast<double>(x[base + v * C + c]) - x[base + c];
        r[0] = d;
        r[1] = d * d;
      },
      sums, kStream);
  launched("groupNorm statistics");
  gn_finalize<<<(n * G + 127) / 128, 128, 0, kStream>>>(sums, x, n, V, C, G, eps, stats);
  launched("groupNorm finalize");
  gn_apply<<<blocks_for(static_cast<int64_t>(n) * V * C), 256, 0, kStream>>>(x, n, V, C, G, gamma, beta, stats, relu, y);
  launched("groupNorm apply");
}

void gn_backward(const float* x, const float* dy, int n, int64_t V, int C, int G, const double* stats, const float* gamma, const float* reluOut, float* dx, float* gg,
                 float* gb) {
  State& st = state();
  const size_t bytes = 2 * static_cast<size_t>(n) * C * sizeof(double);
  double* sums = static_cast<double*>(st.reduce.get(bytes));
  check(cudaMemsetAsync(sums, 0, bytes, kStream), "cudaMemsetAsync");
  launch_channel_reduce<2>(
      n, V, C,
      [x, dy, reluOut, stats, n, V, C, G] __device__(int s, int64_t v, int c, double* r) {
        const int64_t i = static_cast<int64_t>(s) * V * C + v * C + c;
        const float g = reluOut && !(reluOut[i] > 0.f) ? 0.f : dy[i];
        const int sg = s * G + c / (C / G);
        r[0] = g;
        r[1] = static_cast<double>(g) * (x[i] - stats[sg]);
      },
      sums, kStream);
  launched("groupNorm backward sums");
  gn_finalize_params<<<(C + 127) / 128, 128, 0, kStream>>>(sums, n, C, G, stats, gg, gb);
  launched("groupNorm parameter gradients");
  if (dx) {
    double* pq = static_cast<double*>(st.aux.get(2 * static_cast<size_t>(n) * G * sizeof(double)));
    gn_finalize_dx<<<(n * G + 127) / 128, 128, 0, kStream>>>(sums, n, V, C, G, stats, gamma, pq);
    launched("groupNorm dx coefficients");
    gn_dx<<<blocks_for(static_cast<int64_t>(n) * V * C), 256, 0, kStream>>>(x, dy, reluOut, n, V, C, G, stats, gamma, pq, dx);
    launched("groupNorm dx");
  }
}

// ---------------------------------------------------------------- elementwise
namespace {
__global__ void k_fill(float* p, int64_t n, float v) {
  GRID_STRIDE(i, n) p[i] = v;
}
__global__ void k_relu(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  GRID_STRIDE(i, n) {
    const float v = x[i];
    y[i] = v > 0.f || v != v ? v : 0.f;
  }
}
__global__ void k_relu_backward(const float* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx, int64_t n) {
  GRID_STRIDE(i, n) dx[i] = y[i] > 0.f ? dy[i] : 0.f;
}
__global__ void k_add(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, int64_t n, bool relu) {
  GRID_STRIDE(i, n) {
    const float v = a[i] + b[i];
    y[i] = relu && !(v > 0.f) && v == v ? 0.f : v;
  }
}
__global__ void k_add_into(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  GRID_STRIDE(i, n) dst[i] += src[i];
}
__device__ inline int pool_out(int s) { return (s - 1) / 2 + 1; }
// One thread per output value: the first maximum of the 3³ window in (z, y, x) order, NaN wins, padding never.
__global__ void k_max_pool(const float* __restrict__ x, int n, int D, int H, int W, int C, float* __restrict__ y, int* __restrict__ argmax) {
  const int oD = pool_out(D), oH = pool_out(H), oW = pool_out(W);
  const int64_t total = static_cast<int64_t>(n) * oD * oH * oW * C;
  GRID_STRIDE(i, total) {
    const int c = static_cast<int>(i % C);
    int64_t r = i / C;
    const int ox = static_cast<int>(r % oW);
    r /= oW;
    const int oy = static_cast<int>(r % oH);
    r /= oH;
    const int oz = static_cast<int>(r % oD);
    const int b = static_cast<int>(r / oD);
    float m = 0.f;
    int best = -1;
    for (int z = max(0, 2 * oz - 1); z < min(D, 2 * oz + 2); z++) {
      for (int yy = max(0, 2 * oy - 1); yy < min(H, 2 * oy + 2); yy++) {
        for (int xx = max(0, 2 * ox - 1); xx < min(W, 2 * ox + 2); xx++) {
          const int j = static_cast<int>((((static_cast<int64_t>(b) * D + z) * H + yy) * W + xx) * C + c);
          const float v = x[j];
          if (best < 0 || v > m || (v != v && m == m)) {
            m = v;
            best = j;
          }
        }
      }
    }
    y[i] = m;
    argmax[i] = best;
  }
}
// A gather: each input voxel sums dy over the ≤ 8 outputs whose window holds it and whose argmax names it.
__global__ void k_max_pool_backward(const float* __restrict__ dy, const int* __restrict__ argmax, int n, int D, int H, int W, int C, float* __restrict__ dx) {
  const int oD = pool_out(D), oH = pool_out(H), oW = pool_out(W);
  const int64_t total = static_cast<int64_t>(n) * D * H * W * C;
  GRID_STRIDE(i, total) {
    const int c = static_cast<int>(i % C);
    int64_t r = i / C;
    const int x = static_cast<int>(r % W);
    r /= W;
    const int y = static_cast<int>(r % H);
    r /= H;
    const int z = static_cast<int>(r % D);
    const int b = static_cast<int>(r / D);
    float s = 0.f;
    for (int oz = z / 2; oz <= min(oD - 1, (z + 1) / 2); oz++) {
      for (int oy = y / 2; oy <= min(oH - 1, (y + 1) / 2); oy++) {
        for (int ox = x / 2; ox <= min(oW - 1, (x + 1) / 2); ox++) {
          const int64_t o = (((static_cast<int64_t>(b) * oD + oz) * oH + oy) * oW + ox) * C + c;
          if (argmax[o] == i) s += dy[o];
        }
      }
    }
    dx[i] = s;
  }
}
__global__ void k_concat(const float* __restrict__ a, int Ca, const float* __restrict__ b, int Cb, float* __restrict__ y, int64_t voxels) {
  const int C = Ca + Cb;
  GRID_STRIDE(i, voxels * C) {
    const int64_t v = i / C;
    const int c = static_cast<int>(i % C);
    y[i] = c < Ca ? a[v * Ca + c] : b[v * Cb + c - Ca];
  }
}
__global__ void k_split(const float* __restrict__ y, int Ca, int Cb, float* a, float* b, int64_t voxels) {
  const int C = Ca + Cb;
  GRID_STRIDE(i, voxels * C) {
    const int64_t v = i / C;
    const int c = static_cast<int>(i % C);
    if (c < Ca) {
      if (a) a[v * Ca + c] = y[i];
    } else if (b) {
      b[v * Cb + c - Ca] = y[i];
    }
  }
}
__global__ void k_bias_add(float* y, int64_t n, int C, const float* bias) {
  GRID_STRIDE(i, n) y[i] += bias[i % C];
}
__global__ void k_add_sums(float* dst, const double* sums, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < C) dst[c] = static_cast<float>(dst[c] + sums[c]);
}
__global__ void k_shortcut_a(const float* __restrict__ x, int n, int D, int H, int W, int C, int outC, int stride, float* __restrict__ y, bool backward) {
  const int oD = (D - 1) / stride + 1, oH = (H - 1) / stride + 1, oW = (W - 1) / stride + 1;
  const int64_t total = static_cast<int64_t>(n) * oD * oH * oW * outC;
  GRID_STRIDE(i, total) {
    const int c = static_cast<int>(i % outC);
    int64_t r = i / outC;
    const int ox = static_cast<int>(r % oW);
    r /= oW;
    const int oy = static_cast<int>(r % oH);
    r /= oH;
    const int oz = static_cast<int>(r % oD);
    const int b = static_cast<int>(r / oD);
    const int64_t src = (((static_cast<int64_t>(b) * D + oz * stride) * H + oy * stride) * W + ox * stride) * C + c;
    // Forward: x is the input, y the output. Backward: x is dy (output-shaped), y is dx (zeroed before).
    if (!backward) y[i] = c < C ? x[src] : 0.f;
    else if (c < C) y[src] = x[i];
  }
}
}  // namespace

void fill(float* p, int64_t n, float v) {
  k_fill<<<blocks_for(n), 256, 0, kStream>>>(p, n, v);
  launched("fill");
}
void copy(float* dst, const float* src, int64_t n) { check(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, kStream), "copy"); }
void relu(const float* x, float* y, int64_t n) {
  k_relu<<<blocks_for(n), 256, 0, kStream>>>(x, y, n);
  launched("relu");
}
void relu_backward(const float* y, const float* dy, float* dx, int64_t n) {
  k_relu_backward<<<blocks_for(n), 256, 0, kStream>>>(y, dy, dx, n);
  launched("relu backward");
}
void add(const float* a, const float* b, float* y, int64_t n, bool relu) {
  k_add<<<blocks_for(n), 256, 0, kStream>>>(a, b, y, n, relu);
  launched("add");
}
void add_into(float* dst, const float* src, int64_t n) {
  k_add_into<<<blocks_for(n), 256, 0, kStream>>>(dst, src, n);
  launched("addInto");
}
void max_pool(const float* x, int n, int D, int H, int W, int C, float* y, int* argmax) {
  const int64_t total = static_cast<int64_t>(n) * ((D - 1) / 2 + 1) * ((H - 1) / 2 + 1) * ((W - 1) / 2 + 1) * C;
  if (static_cast<int64_t>(n) * D * H * W * C >= (1LL << 31)) throw std::runtime_error("maxPool: input too large for int32 argmax");
  k_max_pool<<<blocks_for(total), 256, 0, kStream>>>(x, n, D, H, W, C, y, argmax);
  launched("maxPool");
}
void max_pool_backward(const float* dy, const int* argmax, int n, int D, int H, int W, int C, float* dx) {
  k_max_pool_backward<<<blocks_for(static_cast<int64_t>(n) * D * H * W * C), 256, 0, kStream>>>(dy, argmax, n, D, H, W, C, dx);
  launched("maxPool backward");
}
void concat(const float* a, int Ca, const float* b, int Cb, float* y, int64_t voxels) {
  k_concat<<<blocks_for(voxels * (Ca + Cb)), 256, 0, kStream>>>(a, Ca, b, Cb, y, voxels);
  launched("concat");
}
void split(const float* y, int Ca, int Cb, float* a, float* b, int64_t voxels) {
  k_split<<<blocks_for(voxels * (Ca + Cb)), 256, 0, kStream>>>(y, Ca, Cb, a, b, voxels);
  launched("split");
}
void bias_add(float* y, int64_t voxels, int C, const float* bias) {
  k_bias_add<<<blocks_for(voxels * C), 256, 0, kStream>>>(y, voxels * C, C, bias);
  launched("biasAdd");
}
void bias_grad_add(float* gb, const float* dy, int64_t voxels, int C) {
  State& st = state();
  double* sums = static_cast<double*>(st.reduce.get(C * sizeof(double)));
  check(cudaMemsetAsync(sums, 0, C * sizeof(double), kStream), "cudaMemsetAsync");
  launch_channel_reduce<1>(
      1, voxels, C, [dy, C] __device__(int, int64_t v, int c, double* r) { r[0] = dy[v * C + c]; }, sums, kStream);
  launched("bias gradient sums");
  k_add_sums<<<(C + 127) / 128, 128, 0, kStream>>>(gb, sums, C);
  launched("bias gradient");
}
void shortcut_a(const float* x, int n, int D, int H, int W, int C, int outC, int stride, float* y) {
  const int64_t total = static_cast<int64_t>(n) * ((D - 1) / stride + 1) * ((H - 1) / stride + 1) * ((W - 1) / stride + 1) * outC;
  k_shortcut_a<<<blocks_for(total), 256, 0, kStream>>>(x, n, D, H, W, C, outC, stride, y, false);
  launched("shortcut A");
}
void shortcut_a_backward(const float* dy, int n, int D, int H, int W, int C, int outC, int stride, float* dx) {
  fill(dx, static_cast<int64_t>(n) * D * H * W * C, 0.f);
  const int64_t total = static_cast<int64_t>(n) * ((D - 1) / stride + 1) * ((H - 1) / stride + 1) * ((W - 1) / stride + 1) * outC;
  k_shortcut_a<<<blocks_for(total), 256, 0, kStream>>>(dy, n, D, H, W, C, outC, stride, dx, true);
  launched("shortcut A backward");
}

// ---------------------------------------------------------------- loss
namespace {
// acc: [0] cross-entropy, then inter[K], psum[K], gsum[K]. The softmax goes into grad (overwritten by pass 2).
__global__ void k_seg_loss_pass1(const float* __restrict__ z, const float* __restrict__ t, const float* w, int64_t voxels, int K, float* __restrict__ p, double* acc) {
  double ce = 0, inter[kMaxClasses], psum[kMaxClasses], gsum[kMaxClasses];
  for (int c = 0; c < K; c++) inter[c] = psum[c] = gsum[c] = 0;
  GRID_STRIDE(v, voxels) {
    const int64_t o = v * K;
    const double wv = w ? w[v] : 1.0;
    double mx = z[o];
    for (int c = 1; c < K; c++) mx = fmax(mx, static_cast<double>(z[o + c]));
    double se = 0;
    for (int c = 0; c < K; c++) se += exp(z[o + c] - mx);
    const double lse = mx + log(se);
    for (int c = 0; c < K; c++) {
      const double g = t[o + c];
      const double pc = exp(z[o + c] - lse);
      p[o + c] = static_cast<float>(pc);
      if (g != 0) ce -= wv * g * (z[o + c] - lse);
      inter[c] += wv * pc * g;
      psum[c] += wv * pc;
      gsum[c] += wv * g;
    }
  }
  // Warp sums, then one atomic per warp and value.
  auto warp_sum = [](double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
  };
  const bool lead = (threadIdx.x & 31) == 0;
  ce = warp_sum(ce);
  if (lead) atomicAdd(&acc[0], ce);
  for (int c = 0; c < K; c++) {
    const double a = warp_sum(inter[c]), b = warp_sum(psum[c]), g = warp_sum(gsum[c]);
    if (lead) {
      atomicAdd(&acc[1 + c], a);
      atomicAdd(&acc[1 + K + c], b);
      atomicAdd(&acc[1 + 2 * K + c], g);
    }
  }
}
__global__ void k_seg_loss_finalize(const double* acc, int64_t voxels, int K, double smooth, float* loss, double* coef) {
  const double ce = acc[0] / voxels;
  double diceMean = 0;
  const double w = -0.5 / (K - 1);
  coef[0] = coef[K] = 0;
  for (int c = 1; c < K; c++) {
    const double den = acc[1 + K + c] + acc[1 + 2 * K + c] + smooth;
    const double num = 2 * acc[1 + c] + smooth;
    diceMean += num / den / (K - 1);
    coef[c] = (w * 2) / den;
    coef[K + c] = (-w * num) / (den * den);
  }
  loss[0] = static_cast<float>(0.5 * (ce + 1 - diceMean));
}
__global__ void k_seg_loss_pass2(const float* __restrict__ t, const float* w, int64_t voxels, int K, const double* coef, float* __restrict__ grad) {
  const double ceScale = 0.5 / voxels;
  GRID_STRIDE(v, voxels) {
    const int64_t o = v * K;
    double a[kMaxClasses];
    double dot = 0;
    for (int c = 0; c < K; c++) {
      a[c] = coef[c] * t[o + c] + coef[K + c];
      dot += grad[o + c] * a[c];
    }
    const double wv = w ? w[v] : 1.0;
    for (int c = 0; c < K; c++) {
      const double pc = grad[o + c];
      grad[o + c] = static_cast<float>(wv * (pc * (a[c] - dot) + ceScale * (pc - t[o + c])));
    }
  }
}
}  // namespace

void segmentation_loss(const float* z, const float* target, const float* weight, int64_t voxels, int K, double smooth, float* loss, float* grad) {
  if (K < 2 || K > kMaxClasses) throw std::runtime_error("segmentation loss: " + std::to_string(K) + " classes (2.." + std::to_string(kMaxClasses) + " supported)");
  State& st = state();
  const size_t accBytes = (1 + 3 * K) * sizeof(double);
  double* acc = static_cast<double*>(st.reduce.get(accBytes));
  double* coef = static_cast<double*>(st.aux.get(2 * K * sizeof(double)));
  check(cudaMemsetAsync(acc, 0, accBytes, kStream), "cudaMemsetAsync");
  const unsigned blocks = blocks_for(voxels) < 1024 ? blocks_for(voxels) : 1024;
  k_seg_loss_pass1<<<blocks, 256, 0, kStream>>>(z, target, weight, voxels, K, grad, acc);
  launched("segmentation loss");
  k_seg_loss_finalize<<<1, 1, 0, kStream>>>(acc, voxels, K, smooth, loss, coef);
  launched("segmentation loss finalize");
  k_seg_loss_pass2<<<blocks_for(voxels), 256, 0, kStream>>>(target, weight, voxels, K, coef, grad);
  launched("segmentation loss gradient");
}

// ---------------------------------------------------------------- optimisers (the host Optimizer's arithmetic, in double)
namespace {
__global__ void k_adam(float* w, const float* g, float* m, float* v, int64_t n, double stepSize, double b1, double b2, double eps, double sqrtC2, double wd) {
  GRID_STRIDE(i, n) {
    const double gi = g[i] + wd * w[i];
    const double mi = b1 * m[i] + (1 - b1) * gi;
    const double vi = b2 * v[i] + (1 - b2) * gi * gi;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    w[i] = static_cast<float>(w[i] - (stepSize * mi) / (sqrt(vi) / sqrtC2 + eps));
  }
}
__global__ void k_sgd(float* w, const float* g, float* buf, int64_t n, double lr, double momentum, double wd, bool first) {
  GRID_STRIDE(i, n) {
    const double gi = g[i] + wd * w[i];
    const double b = first ? gi : momentum * buf[i] + gi;
    buf[i] = static_cast<float>(b);
    w[i] = static_cast<float>(w[i] - lr * (momentum > 0 ? b : gi));
  }
}
}  // namespace

void adam(float* w, const float* g, float* m, float* v, int64_t n, double stepSize, double b1, double b2, double eps, double sqrtC2, double wd) {
  k_adam<<<blocks_for(n), 256, 0, kStream>>>(w, g, m, v, n, stepSize, b1, b2, eps, sqrtC2, wd);
  launched("adam");
}
void sgd(float* w, const float* g, float* buf, int64_t n, double lr, double momentum, double wd, bool first) {
  k_sgd<<<blocks_for(n), 256, 0, kStream>>>(w, g, buf, n, lr, momentum, wd, first);
  launched("sgd");
}

}  // namespace medfl_cuda
