/**
 * Picks the convolution kernels for the Float32Array training engine (Med3D): the oneDNN addon when it
 * was built at install, else the JS loops. MEDFL_KERNELS=onednn|js (or opts.force) requires one and
 * fails loudly, with the fix, when it cannot load.
 */
import type { ConvKernels } from './conv-kernels.ts';
import { jsConvKernels } from '../model/conv3d-cpu.ts';
import type { EngineAttempt } from './select.ts';

export interface KernelSelection {
  readonly kernels: ConvKernels;
  /** Every implementation considered, in order, with why it was or was not used. */
  readonly tried: readonly EngineAttempt[];
}

export const KERNEL_NAMES = ['onednn', 'js'] as const;

async function tryOneDnn(): Promise<{ kernels?: ConvKernels; reason?: string }> {
  try {
    // Loaded lazily: the module needs the compiled addon, which an install without a compiler lacks.
    const mod = (await import('./onednn-kernels.ts')) as { loadOneDnnKernels(): { kernels?: ConvKernels; reason?: string } };
    return mod.loadOneDnnKernels();
  } catch (e) {
    return { reason: `oneDNN kernels could not be loaded: ${(e as Error).message}` };
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
  const tried: EngineAttempt[] = [];
  if (requested === 'auto' || requested === 'onednn') {
    const r = await tryOneDnn();
    if (r.kernels) {
      tried.push({ name: 'onednn', ok: true });
      return { kernels: r.kernels, tried };
    }
    if (requested === 'onednn') {
      throw new Error(`MEDFL_KERNELS=onednn but ${r.reason ?? 'the addon did not load'}. Fix: apt-get install -y libdnnl-dev g++ make && npm run build:native (or unset MEDFL_KERNELS to fall back to the JS kernels).`);
    }
    tried.push({ name: 'onednn', ok: false, reason: r.reason });
  }
  tried.push({ name: 'js', ok: true });
  return { kernels: jsConvKernels, tried };
}
