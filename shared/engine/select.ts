/**
 * Compute-engine selection for the tfjs trainer (tiny3d). In order: native TensorFlow with a GPU, native
 * TensorFlow on CPU (when their optional npm packages load), WebAssembly, pure JS. tfjs-backend-wasm 4.22
 * computes wrong conv3d gradients (training stalls at ln 2), so on wasm, as on cpu, convolutions run through
 * our own verified kernels (conv3d-cpu.ts) and wasm does the rest (element-wise ops, reductions, Adam).
 * The Med3D trainer does not use tfjs: it picks convolution kernels in conv-select.ts.
 */
import type * as TfModule from '@tensorflow/tfjs';

export type EngineName = 'tfjs-node-gpu' | 'tfjs-node' | 'wasm' | 'cpu';

export interface EngineAttempt {
  readonly name: string;
  readonly ok: boolean;
  readonly reason?: string;
}

export interface EngineInfo {
  readonly name: EngineName;
  readonly tf: typeof TfModule;
  /** Every engine considered, in order, with why it was or was not used. */
  readonly tried: readonly EngineAttempt[];
}

export interface SelectEngineOptions {
  /** Engine to require, overriding MEDFL_ENGINE; "auto" means the normal order. */
  readonly force?: string;
}

const ENGINE_NAMES: readonly EngineName[] = ['tfjs-node-gpu', 'tfjs-node', 'wasm', 'cpu'];

const NATIVE_PACKAGES: Record<Exclude<EngineName, 'cpu' | 'wasm'>, { pkg: string; backend: string; hint: string }> = {
  'tfjs-node-gpu': {
    pkg: '@tensorflow/tfjs-node-gpu',
    backend: 'tensorflow',
    hint: 'its install needs internet access to download libtensorflow, and it runs on Linux x64 with an NVIDIA driver, CUDA 11.2 and cuDNN 8',
  },
  'tfjs-node': {
    pkg: '@tensorflow/tfjs-node',
    backend: 'tensorflow',
    hint: 'its install needs internet access to download libtensorflow',
  },
};

const memo = new Map<string, Promise<EngineInfo>>();

/**
 * Picks the engine once per process (per forced name). MEDFL_ENGINE or opts.force selects one
 * engine and fails loudly, with the fix, when it cannot be loaded.
 */
export function selectEngine(opts: SelectEngineOptions = {}): Promise<EngineInfo> {
  const requested = (opts.force ?? process.env.MEDFL_ENGINE ?? 'auto').trim() || 'auto';
  let p = memo.get(requested);
  if (!p) {
    p = resolveEngine(requested);
    // A failed forced selection is not cached, so a caller may install the package and retry.
    p.catch(() => memo.delete(requested));
    memo.set(requested, p);
  }
  return p;
}

async function resolveEngine(requested: string): Promise<EngineInfo> {
  if (requested !== 'auto' && !(ENGINE_NAMES as readonly string[]).includes(requested)) {
    throw new Error(`unknown engine "${requested}" (MEDFL_ENGINE): expected one of auto, ${ENGINE_NAMES.join(', ')}`);
  }
  const tried: EngineAttempt[] = [];
  const order: EngineName[] = requested === 'auto' ? [...ENGINE_NAMES] : [requested as EngineName];
  for (const name of order) {
    if (name === 'cpu') {
      const tf = await loadCpu();
      tried.push({ name: 'cpu', ok: true, reason: 'pure-JS backend of @tensorflow/tfjs' });
      return { name, tf, tried };
    }
    if (name === 'wasm') {
      const w = await loadWasm();
      if ('tf' in w) {
        tried.push({ name, ok: true, reason: 'tfjs-backend-wasm; convolutions on MedFL kernels (wasm conv3d gradients are wrong)' });
        return { name, tf: w.tf, tried };
      }
      tried.push({ name, ok: false, reason: w.reason });
      if (requested !== 'auto') throw new Error(`engine "wasm" was requested (MEDFL_ENGINE or --engine), but ${w.reason}. Reinstall with "npm ci", or use MEDFL_ENGINE=cpu.`);
      continue;
    }
    const attempt = await loadNative(name);
    if ('tf' in attempt) {
      tried.push({ name, ok: true });
      return { name, tf: attempt.tf, tried };
    }
    tried.push({ name, ok: false, reason: attempt.reason });
    if (requested !== 'auto') {
      const { pkg, hint } = NATIVE_PACKAGES[name];
      throw new Error(
        `engine "${name}" was requested (MEDFL_ENGINE or --engine), but ${attempt.reason}. ` +
          `Install it with "npm install ${pkg}" (${hint}), or use MEDFL_ENGINE=cpu.`,
      );
    }
  }
  // Unreachable: "cpu" is last in the order and always returns.
  throw new Error('no compute engine could be selected');
}

/**
 * Loads one native tfjs engine without selecting it: the tf module, or why it did not load. For callers that probe
 * an engine among others (the Med3D kernel choice), where a failure is a reason to move on, not a request refused.
 */
export function probeNativeEngine(name: Exclude<EngineName, 'cpu' | 'wasm'>): Promise<{ tf: typeof TfModule } | { reason: string }> {
  return loadNative(name);
}

async function loadNative(name: Exclude<EngineName, 'cpu' | 'wasm'>): Promise<{ tf: typeof TfModule } | { reason: string }> {
  const { pkg, backend } = NATIVE_PACKAGES[name];
  let mod: unknown;
  try {
    // A variable specifier keeps TypeScript from requiring the optional package's types.
    const specifier: string = pkg;
    mod = await import(specifier);
  } catch (err) {
    return { reason: describeLoadError(err, pkg) };
  }
  // CJS packages arrive as a namespace whose `default` holds the exports.
  const ns = mod as { default?: unknown };
  const tf = (ns.default && typeof (ns.default as { setBackend?: unknown }).setBackend === 'function' ? ns.default : mod) as typeof TfModule;
  try {
    if (!(await tf.setBackend(backend))) return { reason: `${pkg} loaded, but its "${backend}" backend failed to initialise` };
    await tf.ready();
  } catch (err) {
    return { reason: `${pkg} loaded, but its backend failed: ${firstLine(err)}` };
  }
  if (name === 'tfjs-node-gpu' && !hasGpu(tf)) {
    return { reason: `${pkg} loaded, but TensorFlow sees no GPU (check the NVIDIA driver, CUDA and cuDNN)` };
  }
  return { tf };
}

/** tfjs-node-gpu silently runs on CPU when CUDA is missing; report that as a failure of the GPU engine. */
function hasGpu(tf: typeof TfModule): boolean {
  const be = tf.backend() as unknown as { binding?: { isUsingGpuDevice?: () => boolean } };
  const probe = be.binding?.isUsingGpuDevice;
  // Without the probe we cannot tell; trust the package that was installed on purpose.
  return typeof probe === 'function' ? Boolean(probe.call(be.binding)) : true;
}

async function loadWasm(): Promise<{ tf: typeof TfModule } | { reason: string }> {
  try {
    const tf = await import('@tensorflow/tfjs');
    await import('@tensorflow/tfjs-backend-wasm');
    if (!(await tf.setBackend('wasm'))) return { reason: 'the @tensorflow/tfjs-backend-wasm backend failed to initialise' };
    await tf.ready();
    return { tf };
  } catch (err) {
    return { reason: describeLoadError(err, '@tensorflow/tfjs-backend-wasm') };
  }
}

async function loadCpu(): Promise<typeof TfModule> {
  const tf = await import('@tensorflow/tfjs');
  if (!(await tf.setBackend('cpu'))) throw new Error('the @tensorflow/tfjs cpu backend failed to initialise');
  await tf.ready();
  // The cpu backend prints a "Hi, looks like you are running TensorFlow.js in Node.js" banner on its
  // first tensor write; we already chose it deliberately (and report why in `tried`), so mark it as used.
  const be = tf.backend() as unknown as { firstUse?: boolean };
  if (typeof be.firstUse === 'boolean') be.firstUse = false;
  return tf;
}

function describeLoadError(err: unknown, pkg: string): string {
  const code = (err as { code?: unknown })?.code;
  const msg = firstLine(err);
  if ((code === 'ERR_MODULE_NOT_FOUND' || code === 'MODULE_NOT_FOUND') && msg.includes(pkg)) {
    return `${pkg} is not installed (optional dependency)`;
  }
  return `${pkg} failed to load: ${msg}`;
}

function firstLine(err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  return msg.split('\n')[0];
}
