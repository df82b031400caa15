/**
 * InstanceNorm (PyTorch nn.InstanceNorm3d with affine=True, track_running_stats=False): every channel of every
 * sample normalised over its own voxels. That is GroupNorm with one channel per group, so it runs GroupNorm's
 * kernels (JS, or the addon's by name) with G = C; its PyTorch parity is checked against nn.InstanceNorm3d itself.
 */
import { groupNormalisation } from './group-norm.ts';
import type { NormLayer } from './norm-layer.ts';

export const instanceNorm: NormLayer<'instance'> = groupNormalisation('instance', (channels) => channels);
