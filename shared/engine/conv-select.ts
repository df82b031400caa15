/**
 * Picks the convolution kernels for the Float32Array training engine (Med3D), in order: native TensorFlow
 * with a GPU (@tensorflow/tfjs-node-gpu), the oneDNN addon built at install, native TensorFlow on CPU
 * (@tensorflow/tfjs-node), the JS loops. WebAssembly is not in the list for Med3D: tfjs-backend-wasm's conv3d
 * gradients are wrong. MEDFL_KERNELS=<name> (or opts.force) requires one and fails loudly, with the fix,
 * when it cannot load.
 */
import type { ConvKernels } from './conv-kernels.ts';
import { jsConvKernels } from '../model/conv3d-cpu.ts';
import { probeNativeEngine, type EngineAttempt } from './select.ts';
import { createTfjsConvKernels } from './tfjs-conv-kernels.ts';

export interface KernelSelection {
  readonly kernels: ConvKernels;
  /** Every implementation considered, in order, with why it was or was not used. */
  readonly tried: readonly EngineAttempt[];
}

export const KERNEL_NAMES = ['tfjs-node-gpu', 'onednn', 'tfjs-node', 'js'] as const;

type KernelName = (typeof KERNEL_NAMES)[number];

const WASM_NOTE: EngineAttempt = { name: 'wasm', ok: false, reason: 'not used for Med3D: tfjs-backend-wasm 4.22 computes wrong conv3d gradients' };

/** Convolutions on native TensorFlow through tfjs (GPU or CPU), when its optional package loads. */
async function tryTfjsNative(name: 'tfjs-node-gpu' | 'tfjs-node'): Promise<{ kernels?: ConvKernels; reason?: string }> {
  // Probed, not forced: a package that is not there is a reason to try the next kernels, and the log must not
  // say that anybody asked for it (only MEDFL_KERNELS=<name> asks, and resolve() says so when it fails).
  const r = await probeNativeEngine(name);
  return 'tf' in r ? { kernels: createTfjsConvKernels(r.tf, name) } : { reason: r.reason };
}

async function tryOneDnn(): Promise<{ kernels?: ConvKernels; reason?: string }> {
  try {
    // Loaded lazily: the module needs the compiled addon, which an install without a compiler lacks.
    const mod = (await import('./onednn-kernels.ts')) as { loadOneDnnKernels(): { kernels?: ConvKernels; reason?: string } };
    return mod.loadOneDnnKernels();
  } catch (e) {
    return { reason: `oneDNN kernels could not be loaded: ${(e as Error).message}` };
  }
}

/**
 * The CUDA device, reported first: the host-tape trainer cannot use it (its tensors live on the device, see
 * device.ts), so it is never the selected kernels here; the log says whether it was built and whether a GPU is
 * there, with the build's own reason when it was not built.
 */
async function cudaAttempt(): Promise<EngineAttempt> {
  try {
    const mod = await import('./cuda-device.ts');
    const r = mod.loadCudaDevice();
    if ('reason' in r) return { name: 'cuda', ok: false, reason: r.reason };
    return { name: 'cuda', ok: false, reason: `built, ${r.device.info.device} present: used by device training sessions, not by the host-tape kernels` };
  } catch (e) {
    return { name: 'cuda', ok: false, reason: `could not be probed: ${(e as Error).message}` };
  }
}

let memo: Promise<KernelSelection> | undefined;
let memoKey: string | undefined;

export function selectConvKernels(opts: { force?: string } = {}): Promise<KernelSelection> {
  const requested = (opts.force ?? process.env.MEDFL_KERNELS ?? 'auto').trim() || 'auto';
  if (memo && memoKey === requested) return memo;
  memoKey = requested;
  memo = resolve(requested);
  memo.catch(() => {
    memo = undefined;
  });
  return memo;
}

async function resolve(requested: string): Promise<KernelSelection> {
  if (requested !== 'auto' && !(KERNEL_NAMES as readonly string[]).includes(requested)) {
    throw new Error(`unknown convolution kernels "${requested}" (MEDFL_KERNELS): expected auto, ${KERNEL_NAMES.join(', ')}`);
  }
  const tried: EngineAttempt[] = requested === 'auto' ? [await cudaAttempt()] : [];
  const order: readonly KernelName[] = requested === 'auto' ? KERNEL_NAMES : [requested as KernelName];
  for (const name of order) {
    if (name === 'js') {
      if (requested === 'auto') tried.push(WASM_NOTE);
      tried.push({ name: 'js', ok: true });
      return { kernels: jsConvKernels, tried };
    }
    const r = name === 'onednn' ? await tryOneDnn() : await tryTfjsNative(name);
    if (r.kernels) {
      tried.push({ name, ok: true });
      return { kernels: r.kernels, tried };
    }
    tried.push({ name, ok: false, reason: r.reason });
    if (requested !== 'auto') {
      const fix =
        name === 'onednn'
          ? 'apt-get install -y libdnnl-dev g++ make && npm run build:native'
          : `npm install @tensorflow/${name} (its install downloads libtensorflow, so it needs internet)`;
      throw new Error(`MEDFL_KERNELS=${name} but ${r.reason ?? 'it did not load'}. Fix: ${fix} (or unset MEDFL_KERNELS to take the first that loads).`);
    }
  }
  throw new Error('no convolution kernels could be selected');
}
