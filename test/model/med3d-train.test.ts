/**
 * The Med3D training engine against PyTorch in train mode (fixtures from scripts/make_med3d_train_fixtures.py):
 * forward output, every parameter gradient and the BatchNorm running-statistics update, on every
 * convolution-kernel implementation that loads here, each with its elementwise kernels (js: the JS ones;
 * onednn: the addon's native ones).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { jsConvKernels } from '../../shared/model/conv3d-cpu.ts';
import { createTfjsConvKernels } from '../../shared/engine/tfjs-conv-kernels.ts';
import { selectEngine } from '../../shared/engine/select.ts';
import type { ConvKernels } from '../../shared/engine/conv-kernels.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { elementwiseOf } from '../../shared/engine/elementwise-kernels.ts';
import { permute } from '../../shared/checkpoints/torch-mapping.ts';
import { decodeNpy } from '../../shared/io/npy.ts';
import { createMed3dTrainOps, type ParamStore } from '../../shared/model/graph/med3d-ops.ts';
import { act, Tape } from '../../shared/model/graph/tape.ts';
import { createMed3d, med3dFromTorch, med3dOptionsFromMetadata, type Med3dOptions } from '../../shared/model/med3d.ts';
import { med3dEncoderForward, med3dHeadForward } from '../../shared/model/med3d-forward.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { TensorBundle } from '../../shared/tensors/bundle.ts';

const FIX = join(import.meta.dirname, '..', 'fixtures', 'med3d-train');
const npy = (f: string) => decodeNpy(readFileSync(join(FIX, f)), f);
const toNdhwc = (a: { shape: readonly number[]; data: Float32Array }) => permute(a.data, a.shape, [0, 2, 3, 4, 1]).data;

const maxAbs = (a: ArrayLike<number>) => {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
};

/** max|a − b| / max(max|b|, floor): the floor keeps a gradient that is exactly 0 in theory from dividing noise by noise. */
function relErr(got: ArrayLike<number>, want: ArrayLike<number>, floor = 0): number {
  expect(got.length).toBe(want.length);
  let d = 0;
  for (let i = 0; i < want.length; i++) d = Math.max(d, Math.abs(got[i] - want[i]));
  return d / Math.max(maxAbs(want), floor);
}

function load(name: string) {
  const before = decodeSafetensors(readFileSync(join(FIX, `${name}.before.safetensors`)));
  const o = med3dOptionsFromMetadata(before.metadata)! as Med3dOptions;
  const input = npy('input.npy');
  const [, , D, H, W] = input.shape;
  const arch = createMed3d({ ...o, patch: [D, H, W] });
  const weights = med3dFromTorch(arch, before.bundle.values());
  // Gradients have the parameters' layouts: map them through the same conversion, statistics from `before`.
  const gradTorch = decodeSafetensors(readFileSync(join(FIX, `${name}.grad.safetensors`))).bundle;
  const merged = new Map(before.bundle);
  for (const [k, t] of gradTorch) merged.set(k, t);
  const grads = med3dFromTorch(arch, merged.values());
  const afterTorch = decodeSafetensors(readFileSync(join(FIX, `${name}.after.safetensors`))).bundle;
  const merged2 = new Map(before.bundle);
  for (const [k, t] of afterTorch) merged2.set(k, t);
  const after = med3dFromTorch(arch, merged2.values());
  return { arch, weights, grads, after, input, seg: npy(`${name}.seg.npy`), probe: npy(`${name}.probe.npy`) };
}

function storeFor(arch: ReturnType<typeof createMed3d>, weights: TensorBundle) {
  const values = new Map(arch.params().map((p) => [p.name, new Float32Array(weights.get(p.name)!.data)]));
  const shapes = new Map(arch.params().map((p) => [p.name, p.shape]));
  const grads = new Map(arch.params().filter((p) => p.trainable).map((p) => [p.name, new Float32Array(values.get(p.name)!.length)]));
  const store: ParamStore = { value: (n) => values.get(n)!, shape: (n) => shapes.get(n)!, grad: (n) => grads.get(n) };
  return { store, values, grads };
}

const implementations: Promise<ConvKernels[]> = (async () => {
  const sel = await selectConvKernels();
  // tfjs kernels on tfjs's pure-JS cpu backend: the code path a site with tfjs-node(-gpu) runs Med3D on.
  const tfjsCpu = createTfjsConvKernels((await selectEngine({ force: 'cpu' })).tf, 'tfjs-cpu');
  return sel.kernels.name === 'js' ? [jsConvKernels, tfjsCpu] : [jsConvKernels, tfjsCpu, sel.kernels];
})();

describe('Med3D training step vs PyTorch (train mode)', async () => {
  for (const kernels of await implementations) {
    for (const name of ['r10-A', 'r10-B', 'r18-A', 'r50-B']) {
      it(`${name} on ${kernels.name} kernels (${elementwiseOf(kernels).name} BatchNorm/ReLU/pool/add): output, all gradients, running statistics`, () => {
        const fx = load(name);
        const { store, values, grads } = storeFor(fx.arch, fx.weights);
        const tape = new Tape();
        const ops = createMed3dTrainOps({ kernels, store, tape, training: true });
        const params = new Map(fx.arch.params().map((p) => [p.name, p.name]));
        const [n, , D, H, W] = fx.input.shape;
        const x = act(fx.input.data, [n, D, H, W, 1], false);
        const out = med3dHeadForward(fx.arch, params, med3dEncoderForward(fx.arch, params, x, ops), ops);
        expect(relErr(out.data, toNdhwc(fx.seg))).toBeLessThan(1e-4);
        tape.backward(out, toNdhwc(fx.probe));
        let worst = { name: '', err: 0 };
        // Some true gradients are 0 or nearly: a bias followed by a train-mode BatchNorm (the batch mean cancels
        // it), or a 1-in-1-out 1×1×1 conv followed by one (BatchNorm is scale invariant up to its eps). The
        // float64 reference is below 1e-5 of the model's largest gradient there, and float32 rounding noise
        // of a cancelling sum is all a float32 engine can have: such a gradient must stay below that bound;
        // every other gradient must match.
        const scale = Math.max(...[...fx.grads.values()].map((t) => maxAbs(t.data)));
        let zeros = 0;
        for (const p of fx.arch.params()) {
          if (!p.trainable) continue;
          if (maxAbs(fx.grads.get(p.name)!.data) < 1e-5 * scale) {
            zeros++;
            expect(maxAbs(grads.get(p.name)!), `${p.name} should have a zero gradient`).toBeLessThan(1e-5 * scale);
            continue;
          }
          const err = relErr(grads.get(p.name)!, fx.grads.get(p.name)!.data, 1e-4 * scale);
          if (err > worst.err) worst = { name: p.name, err };
        }
        expect(worst.err, `worst gradient ${worst.name}`).toBeLessThan(1e-3);
        expect(zeros).toBeLessThanOrEqual(name === 'r50-B' ? 8 : 1);
        for (const p of fx.arch.params()) {
          if (p.trainable) continue;
          expect(relErr(values.get(p.name)!, fx.after.get(p.name)!.data), p.name).toBeLessThan(1e-5);
        }
      });
    }
  }
});
