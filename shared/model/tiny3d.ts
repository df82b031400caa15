/**
 * tiny3d: the small real 3D segmentation net of the demo. Parameter table and deterministic init only
 * (no tfjs import), so the coordinator can create and check weights without loading an engine; the
 * forward pass lives with the trainer (tfjs-trainer.ts).
 *
 *   encoder.stem  conv 3³ 1→w, ReLU                      (full resolution)  ─────────────┐ skip
 *   encoder.down  conv 3³ w→2w stride 2, ReLU            (half resolution)               │
 *   encoder.mid   conv 3³ 2w→2w, ReLU                                                    │
 *   head.up       conv 3³ 2w→w, ReLU, nearest ×2 upsampling                              │
 *   head.skip     conv 1³ w→w on the stem features, added to the upsampled features  ←──┘, ReLU
 *   head.out      conv 1³ w→numClasses (logits)
 *
 * head.up convolves before upsampling rather than after: at full resolution that one layer would cost
 * 8× the MACs of the whole rest of the net on the pure-JS engine; the 1³ skip restores full-resolution detail.
 */
import { makeBundle, type NamedTensor, type TensorBundle } from '../tensors/bundle.ts';
import { gaussian, mulberry32 } from '../util/random.ts';
import type { ModelArchitecture, ModelPart, ParamInfo } from './types.ts';

export interface Tiny3dOptions {
  /** Training patch [D, H, W]; each must be even (one stride-2 level). */
  readonly patch: readonly [number, number, number];
  /** Output classes including background (default 2). */
  readonly numClasses?: number;
  /** Channels of the first stage (default 8). */
  readonly width?: number;
}

export const TINY3D_ID = 'tiny3d';

interface ConvLayer {
  readonly part: ModelPart;
  readonly stage: string;
  readonly k: number;
  readonly cin: number;
  readonly cout: number;
}

export function tiny3dLayers(width: number, numClasses: number): readonly ConvLayer[] {
  const w = width;
  return [
    { part: 'encoder', stage: 'stem', k: 3, cin: 1, cout: w },
    { part: 'encoder', stage: 'down', k: 3, cin: w, cout: 2 * w },
    { part: 'encoder', stage: 'mid', k: 3, cin: 2 * w, cout: 2 * w },
    { part: 'head', stage: 'up', k: 3, cin: 2 * w, cout: w },
    { part: 'head', stage: 'skip', k: 1, cin: w, cout: w },
    { part: 'head', stage: 'out', k: 1, cin: w, cout: numClasses },
  ];
}

export function createTiny3d(opts: Tiny3dOptions): ModelArchitecture {
  const numClasses = opts.numClasses ?? 2;
  const width = opts.width ?? 8;
  const patch = [...opts.patch] as [number, number, number];
  if (patch.length !== 3 || patch.some((d) => !Number.isInteger(d) || d < 2 || d % 2 !== 0)) {
    throw new Error(`tiny3d: patch must be three even integers ≥ 2 (one stride-2 level), got [${opts.patch.join(', ')}]`);
  }
  if (!Number.isInteger(numClasses) || numClasses < 2 || numClasses > 255) {
    throw new Error(`tiny3d: numClasses must be an integer in 2..255, got ${numClasses}`);
  }
  if (!Number.isInteger(width) || width < 1) throw new Error(`tiny3d: width must be a positive integer, got ${width}`);

  const layers = tiny3dLayers(width, numClasses);
  const params: ParamInfo[] = [];
  for (const l of layers) {
    const base = `${l.part}.${l.stage}.conv`;
    const common = { dtype: 'F32' as const, part: l.part, layerType: 'conv' as const, stage: l.stage, trainable: true };
    params.push({ name: `${base}.weight`, shape: [l.k, l.k, l.k, l.cin, l.cout], ...common });
    params.push({ name: `${base}.bias`, shape: [l.cout], ...common });
  }
  Object.freeze(params);

  return {
    id: TINY3D_ID,
    numClasses,
    patchShape: Object.freeze(patch) as readonly [number, number, number],
    params: () => params,
    init(seed: number): TensorBundle {
      // One stream in parameter order: the same seed gives bit-identical weights on every machine.
      const rng = mulberry32(seed);
      const tensors: NamedTensor[] = [];
      for (const l of layers) {
        const base = `${l.part}.${l.stage}.conv`;
        // Kaiming-normal, fan_out mode (as nnU-Net / PyTorch for ReLU nets): std = sqrt(2 / (k³·out)).
        const std = Math.sqrt(2 / (l.k * l.k * l.k * l.cout));
        const w = new Float32Array(l.k * l.k * l.k * l.cin * l.cout);
        for (let i = 0; i < w.length; i++) w[i] = gaussian(rng) * std;
        tensors.push({ name: `${base}.weight`, dtype: 'F32', shape: [l.k, l.k, l.k, l.cin, l.cout], data: w });
        tensors.push({ name: `${base}.bias`, dtype: 'F32', shape: [l.cout], data: new Float32Array(l.cout) });
      }
      return makeBundle(tensors);
    },
  };
}
