// The segmentation training loss over logits in C++: 0.5 * (cross-entropy + 1 - mean soft Dice of the
// foreground classes), Dice per class over the whole batch, and its gradient with respect to the logits.
// Semantics and the JS twin: shared/model/graph/segmentation-loss.ts.
#pragma once

#include <cstdint>

namespace medfl {

// z, target [nv, C] (target rows sum to 1, soft rows allowed); weight [nv] nullable (scales each voxel's share of
// the cross-entropy and the Dice sums); grad [nv, C] written completely. Returns the loss.
double segmentation_loss(const float* z, const float* target, const float* weight, int64_t nv, int64_t C, double smooth,
                         float* grad);

}  // namespace medfl
