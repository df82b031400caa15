/**
 * ConvKernels over a tfjs backend (what a site with @tensorflow/tfjs-node(-gpu) runs Med3D's convolutions
 * on), checked here on tfjs's pure-JS cpu backend against MedFL's JS kernels, dilated and strided
 * geometries included, and through the PyTorch training-step fixture of a whole Med3D model.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import type * as TfModule from '@tensorflow/tfjs';
import { selectEngine } from '../../shared/engine/select.ts';
import { createTfjsConvKernels, dilateFilter } from '../../shared/engine/tfjs-conv-kernels.ts';
import { inputLength, outputLength, tfSameGeom, torchConvGeom, weightLength, type Conv3dGeom, type ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { jsConvKernels } from '../../shared/model/conv3d-cpu.ts';
import { mulberry32 } from '../../shared/util/random.ts';

let tf: typeof TfModule;
let kernels: ConvKernels;
beforeAll(async () => {
  tf = (await selectEngine({ force: 'cpu' })).tf;
  kernels = createTfjsConvKernels(tf, 'tfjs-cpu');
});

const rand = (n: number, seed: number) => {
  const rng = mulberry32(seed);
  return Float32Array.from({ length: n }, () => rng() * 2 - 1);
};
const relErr = (a: Float32Array, b: Float32Array) => {
  expect(a.length).toBe(b.length);
  let d = 0;
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    d = Math.max(d, Math.abs(a[i] - b[i]));
    m = Math.max(m, Math.abs(b[i]));
  }
  return d / m;
};

const geoms: [string, Conv3dGeom][] = [
  ['k7 s2 p3 (conv1)', torchConvGeom([2, 9, 8, 7, 1], 4, { k: 7, stride: 2, pad: 3 })],
  ['k3 s1 p1', torchConvGeom([1, 5, 6, 7, 3], 4, { k: 3, pad: 1 })],
  ['k3 s2 p1, odd sizes', torchConvGeom([2, 7, 5, 9, 2], 3, { k: 3, stride: 2, pad: 1 })],
  ['k3 dilation 2 pad 2', torchConvGeom([1, 5, 6, 4, 3], 2, { k: 3, dilation: 2, pad: 2 })],
  ['k3 dilation 4 pad 4 on a 3³ map', torchConvGeom([2, 3, 3, 4, 2], 3, { k: 3, dilation: 4, pad: 4 })],
  ['k1 s2 (projection)', torchConvGeom([1, 7, 6, 5, 4], 3, { k: 1, stride: 2 })],
  ['k2 s2 (transposed-conv partner)', torchConvGeom([1, 6, 4, 8, 3], 2, { k: 2, stride: 2 })],
  ['TF same, stride 2, even size (asymmetric)', tfSameGeom([1, 6, 6, 6, 2], 3, 3, 2)],
  ['dilation 2 with stride 2 (filter expanded)', torchConvGeom([1, 9, 9, 9, 2], 2, { k: 3, stride: 2, dilation: 2, pad: 2 })],
];

describe('tfjs ConvKernels (on the cpu backend) match the JS kernels', () => {
  for (const [name, g] of geoms) {
    it(name, () => {
      const x = rand(inputLength(g), 1);
      const w = rand(weightLength(g), 2);
      const dy = rand(outputLength(g), 3);
      expect(relErr(kernels.conv3d(x, w, g), jsConvKernels.conv3d(x, w, g))).toBeLessThan(1e-5);
      expect(relErr(kernels.conv3dBackwardData(dy, w, g), jsConvKernels.conv3dBackwardData(dy, w, g))).toBeLessThan(1e-5);
      expect(relErr(kernels.conv3dBackwardFilter(x, dy, g), jsConvKernels.conv3dBackwardFilter(x, dy, g))).toBeLessThan(1e-5);
    });
  }

  it('leaves no tensors behind and expands dilated filters with zeros between taps', () => {
    const g = geoms[3][1];
    const before = tf.memory().numTensors;
    kernels.conv3d(rand(inputLength(g), 1), rand(weightLength(g), 2), g);
    kernels.conv3dBackwardData(rand(outputLength(g), 3), rand(weightLength(g), 2), g);
    kernels.conv3dBackwardFilter(rand(inputLength(g), 1), rand(outputLength(g), 3), g);
    expect(tf.memory().numTensors).toBe(before);
    const e = dilateFilter(Float32Array.from([1, 2, 3, 4, 5, 6, 7, 8]), [2, 2, 2], [2, 1, 3], 1, 1);
    expect(e.k).toEqual([3, 2, 4]);
    expect([...e.data].filter((v) => v !== 0)).toEqual([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(e.data[((2 * 2 + 1) * 4 + 3)]).toBe(8);
  });
});
