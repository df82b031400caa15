/**
 * Engine selection in the documented order (native GPU → native CPU → wasm → pure JS), in a process of its
 * own because selection switches tfjs's global backend; and the wasm engine trains tiny3d exactly as the
 * pure-JS one does (its convolutions run on MedFL's kernels; wasm's own conv3d gradients are wrong).
 */
import { describe, expect, it } from 'vitest';
import { selectEngine } from '../../shared/engine/select.ts';
import { selectConvKernels } from '../../shared/engine/conv-select.ts';
import { createTfjsTrainer } from '../../shared/model/tfjs-trainer.ts';
import { createTiny3d } from '../../shared/model/tiny3d.ts';
import { sphereCase } from '../helpers/volumes.ts';
import { isInstalled } from '../helpers/modules.ts';


describe('engine selection', () => {
  it('tries native GPU, native CPU, then wasm, and says why each was or was not used', async () => {
    const native = isInstalled('@tensorflow/tfjs-node') || isInstalled('@tensorflow/tfjs-node-gpu');
    const auto = await selectEngine({ force: 'auto' });
    if (native) {
      expect(['tfjs-node-gpu', 'tfjs-node']).toContain(auto.name);
      return;
    }
    // Not installable here (libtensorflow comes from the internet at install): wasm is next.
    expect(auto.name).toBe('wasm');
    expect(auto.tf.getBackend()).toBe('wasm');
    expect(auto.tried.map((t) => t.name)).toEqual(['tfjs-node-gpu', 'tfjs-node', 'wasm']);
    expect(auto.tried[0]).toMatchObject({ ok: false, reason: expect.stringMatching(/not installed/) });
    expect(auto.tried[2]).toMatchObject({ ok: true, reason: expect.stringMatching(/convolutions on MedFL kernels/) });
    await expect(selectEngine({ force: 'cuda' })).rejects.toThrow(/unknown engine "cuda"/);
  });

  it('the wasm engine trains tiny3d to the same weights as the pure-JS engine (float32 tolerance)', async () => {
    const arch = createTiny3d({ patch: [12, 12, 12], width: 4 });
    const cases = Array.from({ length: 3 }, (_, i) => sphereCase(i + 1, 12, 0.5));
    const req = { weights: arch.init(1), cases, steps: 3, batchSize: 2, learningRate: 0.01, seed: 4 };
    const cpu = await selectEngine({ force: 'cpu' });
    expect(cpu.tf.getBackend()).toBe('cpu');
    const a = await createTfjsTrainer(arch, cpu).train(req);
    const wasm = await selectEngine({ force: 'wasm' });
    expect(wasm.tf.getBackend()).toBe('wasm');
    const trainer = createTfjsTrainer(arch, wasm);
    expect(trainer.engine).toBe('wasm');
    const b = await trainer.train(req);
    expect(b.firstLoss).toBeCloseTo(a.firstLoss, 4);
    for (const [name, t] of a.weights) {
      const u = b.weights.get(name)!.data;
      let d = 0;
      let m = 0;
      for (let i = 0; i < u.length; i++) {
        d = Math.max(d, Math.abs(u[i] - t.data[i]));
        m = Math.max(m, Math.abs(t.data[i]));
      }
      expect(d / m, name).toBeLessThan(1e-3);
    }
  });

  it('Med3D convolution kernels: the CUDA device (reported), native TensorFlow GPU, oneDNN, native TensorFlow CPU, JS — each refusal with its reason', async () => {
    const sel = await selectConvKernels();
    const names = sel.tried.map((t) => t.name);
    expect(sel.tried.at(-1)).toMatchObject({ name: sel.kernels.name, ok: true });
    // No GPU here: the CUDA device is refused with the reason (not built and the build's own line, or no usable GPU).
    expect(sel.tried[0]).toMatchObject({ name: 'cuda', ok: false, reason: expect.stringMatching(/^(not built \(.+\)|built, but no usable GPU: .+)/) });
    if (!isInstalled('@tensorflow/tfjs-node-gpu')) expect(sel.tried[1]).toMatchObject({ name: 'tfjs-node-gpu', ok: false, reason: expect.stringMatching(/not installed/) });
    if (sel.kernels.name === 'onednn') expect(names).toEqual(['cuda', 'tfjs-node-gpu', 'onednn']);
    if (sel.kernels.name === 'js') {
      expect(names).toEqual(['cuda', 'tfjs-node-gpu', 'onednn', 'tfjs-node', 'wasm', 'js']);
      expect(sel.tried[4]).toMatchObject({ ok: false, reason: expect.stringMatching(/wrong conv3d gradients/) });
    }
    await expect(selectConvKernels({ force: 'mkl' })).rejects.toThrow(/unknown convolution kernels "mkl"/);
    if (!isInstalled('@tensorflow/tfjs-node')) await expect(selectConvKernels({ force: 'tfjs-node' })).rejects.toThrow(/MEDFL_KERNELS=tfjs-node but .*not installed.*needs internet/);
    expect((await selectConvKernels({ force: 'js' })).kernels.name).toBe('js');
  });

});
