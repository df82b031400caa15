// The post-network step of sliding-window inference in one pass: a batch of windows' logits on the head's coarse
// grid, upsampled linearly (PyTorch's trilinear, align_corners=False) to the window, turned into probabilities and
// added into the volume with the blending weight. Semantics and the JS twin: shared/model/window-blend.ts.
#pragma once

#include <cstdint>

namespace medfl {

struct WindowBlendGeom {
  int64_t n;         // windows in the batch
  int64_t C;         // classes
  int64_t f;         // upsampling factor (the window's sides are multiples of it)
  int64_t wd, wh, ww;  // window
  int64_t D, H, W;   // volume
};

// logits [n, wd/f, wh/f, ww/f, C]; starts [n, 3] (z, y, x), each window cropped to the volume; weight [wd·wh·ww].
// Two classes: acc [D·H·W] += weight · p(class 1); otherwise acc [D·H·W, C] += weight · p (softmax). wsum [D·H·W]
// += weight. Windows are added one after another (they overlap); the voxels of one window are spread over threads.
void window_blend(const float* logits, const int32_t* starts, const WindowBlendGeom& g, const float* weight, float* acc,
                  float* wsum);

// The blended probabilities [D·H·W, C] from the sums: acc / wsum per voxel (two classes: 1 − p1, p1), in float64
// like the JS twin, so the result is the same bit for bit.
void window_normalise(const float* acc, const float* wsum, int64_t voxels, int64_t C, float* out);

}  // namespace medfl
