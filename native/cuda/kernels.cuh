// CUDA kernels of the "cuda" ComputeDevice (shared/engine/cuda-device.ts): everything a Med3D training step runs
// besides the cuDNN convolutions. Layouts are the host engine's: NDHWC activations (channels innermost),
// per-channel vectors of C floats. Semantics follow shared/engine/elementwise-kernels.ts (PyTorch's); sums are
// accumulated in double. All kernels run on the legacy default stream, in order, so scratch memory can be reused
// by the next operation without synchronising.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace medfl_cuda {

constexpr int kMaxClasses = 32;

// ---- launch helpers ----
inline unsigned blocks_for(int64_t n, int threads = 256) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

#define GRID_STRIDE(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)blockDim.x * gridDim.x)

// Per (sample, channel) sums of K values f(s, v, c) over the V voxels of each sample, added (atomically) into
// out[(s * C + c) * K + j]. Blocks are 32 channels × 8 voxel lanes; grid (channel tiles, voxel chunks, samples).
template <int K, class F>
__global__ void channel_reduce(int64_t V, int C, int64_t vchunk, F f, double* out) {
  const int c = blockIdx.x * 32 + threadIdx.x;
  const int s = blockIdx.z;
  const int64_t v0 = blockIdx.y * vchunk;
  const int64_t v1 = v0 + vchunk < V ? v0 + vchunk : V;
  double acc[K];
#pragma unroll
  for (int j = 0; j < K; j++) acc[j] = 0;
  if (c < C) {
    for (int64_t v = v0 + threadIdx.y; v < v1; v += blockDim.y) {
      double r[K];
      f(s, v, c, r);
#pragma unroll
      for (int j = 0; j < K; j++) acc[j] += r[j];
    }
  }
  __shared__ double sh[K][8][32];
#pragma unroll
  for (int j = 0; j < K; j++) sh[j][threadIdx.y][threadIdx.x] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int j = 0; j < K; j++) {
      double t = 0;
      for (int y = 0; y < 8; y++) t += sh[j][y][threadIdx.x];
      atomicAdd(&out[(static_cast<int64_t>(s) * C + c) * K + j], t);
    }
  }
}

template <int K, class F>
void launch_channel_reduce(int n, int64_t V, int C, F f, double* out, cudaStream_t stream) {
  const int gx = (C + 31) / 32;
  int64_t gy = 2048 / (static_cast<int64_t>(gx) * n);
  const int64_t maxY = (V + 63) / 64;
  if (gy > maxY) gy = maxY;
  if (gy < 1) gy = 1;
  if (gy > 65535) gy = 65535;
  const int64_t vchunk = (V + gy - 1) / gy;
  dim3 grid(gx, static_cast<unsigned>(gy), n);
  channel_reduce<K><<<grid, dim3(32, 8), 0, stream>>>(V, C, vchunk, f, out);
}

}  // namespace medfl_cuda
