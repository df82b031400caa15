/**
 * "onednn" ConvKernels: the native addon in native/ (Node-API over oneDNN 2.x, the library PyTorch uses
 * for convolutions on CPU). Built at `npm ci` by scripts/build-native.mjs when libdnnl-dev, g++ and make
 * are installed; `loadOneDnnKernels()` never throws and says what is missing when it is not built.
 *
 * Tensors are passed as they are (NDHWC activations, DHWIO weights: oneDNN's `ndhwc` / `dhwio` tags), the
 * caller's Float32Arrays serve as oneDNN's memory, and primitives are cached per geometry in the addon.
 * Calls are synchronous; oneDNN runs them on its OpenMP threads (OMP_NUM_THREADS, default: all cores;
 * OMP_WAIT_POLICY defaults to PASSIVE here, see loadAddon).
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { inputLength, outputLength, padAfter, weightLength, type Conv3dGeom, type ConvKernels } from './conv-kernels.ts';
import { hasElementwise, nativeElementwiseKernels, uninitF32, type ElementwiseKernels } from './elementwise-kernels.ts';

/**
 * Memory formats the primitives may use (the caller's tensors stay NDHWC / DHWIO; oneDNN reorders):
 *  - plain: exactly the caller's ndhwc / dhwio (no reorders; oneDNN then picks its gemm convolution),
 *  - any-weights: activations as they are, weights in oneDNN's blocked format (reordered on each call;
 *    they are small): the jit/brgconv AVX-512 kernels, fastest for nearly every shape measured,
 *  - any: every tensor in the format oneDNN prefers (reorders on activations too; never faster here),
 *  - ncsp: activations reordered to ncdhw (PyTorch's default), weights any,
 *  - default: any-weights, except the data gradient of a 1-channel input (conv1), where oneDNN's plain
 *    gemm beats the jit kernel 1.5–5× (see defaultLayout),
 *  - auto: on the first call of each (operation, geometry) time the four once and keep the fastest.
 */
export type OneDnnLayout = 'plain' | 'any-weights' | 'any' | 'ncsp' | 'default' | 'auto';

/**
 * Where results live: "js" allocates a Float32Array in JS and the addon writes into it; "external" lets
 * the addon allocate (64-byte aligned) and hand the memory over as an external ArrayBuffer.
 */
export type OneDnnOutput = 'js' | 'external';

export interface OneDnnOptions {
  readonly layout?: OneDnnLayout;
  readonly output?: OneDnnOutput;
  /** OpenMP threads for oneDNN; default: OMP_NUM_THREADS, else every core the process may use. */
  readonly threads?: number;
}

export interface OneDnnInfo {
  readonly version: string;
  readonly runtime: string;
  readonly isa: string;
  readonly threads: number;
  readonly procs: number;
  readonly cachedPrimitives: number;
}

/** The addon's raw interface (native/src/addon.cc). */
export interface OneDnnAddon {
  run(op: number, layout: number, geom: Int32Array, a: Float32Array, b: Float32Array, out?: Float32Array): Float32Array;
  impl(op: number, layout: number, geom: Int32Array): string;
  drop(op: number, layout: number, geom: Int32Array): boolean;
  setThreads(n: number): void;
  info(): OneDnnInfo;
  clearCache(): void;
}

export interface OneDnnKernels extends ConvKernels {
  readonly addon: OneDnnAddon;
  /**
   * BatchNorm, ReLU, max-pool and add in the addon's C++ loops (createMed3dTrainOps picks them up through
   * elementwiseOf); undefined with an addon built before they existed (the JS ones are used then).
   */
  readonly elementwise?: ElementwiseKernels;
  /** Implementation oneDNN picked for an operation and geometry, e.g. "jit:avx512_core <reorder" (builds it if needed). */
  impl(op: 'forward' | 'backwardData' | 'backwardFilter', g: Conv3dGeom): string;
}

export type OneDnnLoadResult = { kernels: OneDnnKernels; info: OneDnnInfo } | { kernels: undefined; reason: string };

export const ONEDNN_ADDON_PATH = fileURLToPath(new URL('../../native/build/Release/medfl_onednn.node', import.meta.url));
const FIX = 'apt-get install -y libdnnl-dev g++ make && npm run build:native';

const OP = { forward: 0, backwardData: 1, backwardFilter: 2 } as const;
const LAYOUTS = { plain: 0, 'any-weights': 1, any: 2, ncsp: 3 } as const;
const ALL_LAYOUTS = [0, 1, 2, 3] as const;

/**
 * The 'default' layout's rule (see OneDnnLayout). The data gradient of a 1-channel input (conv1; training
 * never needs it, the image has no gradient) runs 1.5–5× faster in oneDNN's plain (ndhwc) gemm than in the
 * jit kernel. The ncsp gemm is faster on one thread (50 vs 75 ms, w1 conv1 on 64³) but not on two (43 vs
 * 39 ms), and with two spin-waiting threads next to a busy process it took 1.2 s (plain: 0.1 s).
 */
function defaultLayout(op: number, g: Conv3dGeom): number {
  return op === OP.backwardData && g.cin === 1 ? LAYOUTS.plain : LAYOUTS['any-weights'];
}

/** Layout the auto mode chose per (op, geometry), shared by every kernels object over the one addon. */
const chosen = new Map<string, number>();

let addonCache: { addon: OneDnnAddon } | { reason: string } | undefined;

function loadAddon(): { addon: OneDnnAddon } | { reason: string } {
  if (addonCache) return addonCache;
  if (!existsSync(ONEDNN_ADDON_PATH)) {
    const headers = existsSync('/usr/include/oneapi/dnnl/dnnl.hpp') || existsSync('/usr/include/dnnl.hpp');
    addonCache = {
      reason:
        `oneDNN addon not built (${ONEDNN_ADDON_PATH} is missing${headers ? '' : '; the oneDNN headers are not installed'}); ` +
        `fix: ${FIX}`,
    };
    return addonCache;
  }
  const unfit = hostProblem();
  if (unfit) {
    addonCache = { reason: unfit };
    return addonCache;
  }
  // OpenMP threads that wait for work spin by default. With another busy process on a 2-core machine (a
  // second site, the coordinator, this process's own JS between calls) the spinning thread takes the core
  // from the one it waits for, and every convolution stalls for scheduler slices (16–32 ms on sub-ms work,
  // bench:conv). Sleeping waits cost microseconds. libgomp reads this once, when the addon loads it.
  if (process.env.OMP_WAIT_POLICY === undefined) process.env.OMP_WAIT_POLICY = 'PASSIVE';
  try {
    const addon = createRequire(import.meta.url)(ONEDNN_ADDON_PATH) as OneDnnAddon;
    addonCache = { addon };
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    addonCache = { reason: `oneDNN addon failed to load (${msg.split('\n')[0]}); fix: ${oneDnnLoadFix(msg)}` };
  }
  return addonCache;
}

/**
 * CPU features of the x86-64-v2 level native/binding.gyp builds for (names as /proc/cpuinfo spells them). A host
 * without them would die with SIGILL inside the addon, which no catch can turn into a message; checked first.
 */
export const X86_64_V2_FLAGS = ['cx16', 'lahf_lm', 'popcnt', 'sse4_1', 'sse4_2', 'ssse3'] as const;

/** Why this process cannot run the addon at all (before dlopen), or undefined. */
function hostProblem(): string | undefined {
  // binding.gyp defines NAPI_VERSION=8 (Node ≥ 12.22); MedFL itself needs Node 20.
  const napi = Number(process.versions.napi ?? 0);
  if (napi < 8) return `oneDNN addon needs Node-API 8, this Node ${process.version} has ${napi}; fix: use Node 20 (deploy/README.md) and ${FIX}`;
  if (process.platform !== 'linux' || process.arch !== 'x64') return undefined;
  let cpuinfo: string;
  try {
    cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    return undefined; // no /proc (containers without it): nothing to check against
  }
  const missing = missingCpuFlags(cpuinfo);
  if (missing.length === 0) return undefined;
  return (
    `this CPU lacks ${missing.join(', ')} (x86-64-v2), which the oneDNN addon is built for; loading it would crash with SIGILL. ` +
    'fix: none needed, training uses the JS kernels (slower); or build the addon with a lower -march in native/binding.gyp on this host'
  );
}

/** X86_64_V2_FLAGS that the first CPU of a /proc/cpuinfo text lacks ([] when it lists no flags at all). */
export function missingCpuFlags(cpuinfo: string): string[] {
  const line = /^flags\s*:(.*)$/m.exec(cpuinfo);
  if (!line) return [];
  const flags = new Set(line[1].trim().split(/\s+/));
  return X86_64_V2_FLAGS.filter((f) => !flags.has(f));
}

/** The fix for a dlopen failure of the addon, from Node's message. */
export function oneDnnLoadFix(msg: string): string {
  if (/libdnnl|libgomp/.test(msg) && /cannot open shared object/.test(msg)) {
    return 'install the runtime libraries: Debian/Ubuntu apt-get install -y libdnnl2 libgomp1 (deploy/README.md covers RHEL-like hosts)';
  }
  if (/NODE_MODULE_VERSION|different Node\.js version|Module did not self-register/.test(msg)) {
    return `it was built for another Node version; use Node 20 and rebuild: ${FIX}`;
  }
  if (/wrong ELF class|invalid ELF header|ELF file|exec format/i.test(msg)) {
    return `it was built for another CPU architecture or OS (node_modules copied between hosts?); rebuild on this host: ${FIX}`;
  }
  if (/undefined symbol/.test(msg)) return `it was built against another oneDNN version than the one installed; rebuild: ${FIX}`;
  return `rebuild it: ${FIX}`;
}

/** Geometry as the addon reads it: n, in[3], cin, cout, k[3], stride[3], dilation[3], padBefore[3], padAfter[3], out[3]. */
function packGeom(g: Conv3dGeom): Int32Array {
  const pa = padAfter(g);
  return Int32Array.from([g.n, ...g.in, g.cin, g.cout, ...g.k, ...g.stride, ...g.dilation, ...g.padBefore, ...pa, ...g.out]);
}

/**
 * oneDNN accepts padding after down to 1 − stride (the rounding slack of the output size). When more
 * trailing input is never read, convolve a cropped copy of the input instead.
 */
function croppedGeom(g: Conv3dGeom): Conv3dGeom | undefined {
  const pa = padAfter(g);
  if (pa.every((p, i) => p > -g.stride[i])) return undefined;
  const inp = g.in.map((size, i) => (pa[i] > -g.stride[i] ? size : size + pa[i])) as unknown as Conv3dGeom['in'];
  return { ...g, in: inp };
}

/**
 * Copies the [0, to.in) corner of an NDHWC tensor of geometry `from` (crop) or back into zeros (uncrop), into
 * `into` (zeroed here first) when given.
 */
function cornerCopy(src: Float32Array, from: Conv3dGeom, to: Conv3dGeom, crop: boolean, into?: Float32Array): Float32Array {
  const big = crop ? from : to;
  const small = crop ? to : from;
  const dst = into ? into.fill(0) : new Float32Array(inputLength(to));
  const c = big.cin;
  const row = small.in[2] * c;
  for (let n = 0; n < big.n; n++)
    for (let d = 0; d < small.in[0]; d++)
      for (let h = 0; h < small.in[1]; h++) {
        const bigOff = (((n * big.in[0] + d) * big.in[1] + h) * big.in[2]) * c;
        const smallOff = (((n * small.in[0] + d) * small.in[1] + h) * small.in[2]) * c;
        if (crop) dst.set(src.subarray(bigOff, bigOff + row), smallOff);
        else dst.set(src.subarray(smallOff, smallOff + row), bigOff);
      }
  return dst;
}

function checkLength(what: string, a: Float32Array, want: number): void {
  if (a.length !== want) throw new Error(`onednn: ${what} has ${a.length} elements, the geometry needs ${want}`);
}

/** Loads the addon and wraps it as ConvKernels; never throws. */
export function loadOneDnnKernels(opts: OneDnnOptions = {}): OneDnnLoadResult {
  const loaded = loadAddon();
  if ('reason' in loaded) return { kernels: undefined, reason: loaded.reason };
  const { addon } = loaded;
  try {
    if (opts.threads !== undefined) addon.setThreads(opts.threads);
    return { kernels: wrap(addon, opts), info: addon.info() };
  } catch (err) {
    return { kernels: undefined, reason: `oneDNN addon loaded but failed: ${err instanceof Error ? err.message : String(err)}` };
  }
}

function wrap(addon: OneDnnAddon, opts: OneDnnOptions): OneDnnKernels {
  const layoutOpt = opts.layout ?? 'default';
  const external = (opts.output ?? 'js') === 'external';
  const packed = new WeakMap<Conv3dGeom, Int32Array>();
  const geomOf = (g: Conv3dGeom): Int32Array => {
    let p = packed.get(g);
    if (!p) packed.set(g, (p = packGeom(g)));
    return p;
  };

  const exec = (op: number, g: Conv3dGeom, a: Float32Array, b: Float32Array, outLen: number, out?: Float32Array): Float32Array => {
    const geom = geomOf(g);
    if (out) checkLength('out', out, outLen);
    // oneDNN writes every value of each result (test/engine/native-unet-kernels.test.ts hands it NaN-filled
    // outputs), so a caller's `out` needs no zeroing; without one, the forward output is left unzeroed and the
    // gradients keep zeroed memory as before.
    const alloc = (): Float32Array | undefined => out ?? (external ? undefined : op === OP.forward ? uninitF32(outLen) : new Float32Array(outLen));
    if (layoutOpt === 'default') return addon.run(op, defaultLayout(op, g), geom, a, b, alloc());
    if (layoutOpt !== 'auto') return addon.run(op, LAYOUTS[layoutOpt], geom, a, b, alloc());
    const key = `${op}:${geom.join(',')}`;
    const known = chosen.get(key);
    if (known !== undefined) return addon.run(op, known, geom, a, b, alloc());
    // First call of this (op, geometry): for each layout build the primitive and warm it up with one run,
    // then keep the best of two timed runs (one timing alone is often a scheduler hiccup on a shared
    // machine); keep the fastest layout and drop the others' cached primitives and buffers. Every run
    // computes the full result, so the caller gets the last one.
    let best = 0;
    let bestMs = Infinity;
    let result: Float32Array | undefined;
    let failure: unknown;
    for (const layout of ALL_LAYOUTS) {
      try {
        addon.run(op, layout, geom, a, b, alloc());
        let ms = Infinity;
        for (let rep = 0; rep < 2; rep++) {
          const t0 = performance.now();
          result = addon.run(op, layout, geom, a, b, alloc());
          ms = Math.min(ms, performance.now() - t0);
        }
        if (ms < bestMs) [best, bestMs] = [layout, ms];
      } catch (err) {
        failure = err;
      }
    }
    if (bestMs === Infinity) throw failure;
    for (const layout of ALL_LAYOUTS) if (layout !== best) addon.drop(op, layout, geom);
    chosen.set(key, best);
    return result!;
  };

  const withCrop = (g: Conv3dGeom, x: Float32Array, run: (g: Conv3dGeom, x: Float32Array) => Float32Array): Float32Array => {
    const c = croppedGeom(g);
    return c ? run(c, cornerCopy(x, g, c, true)) : run(g, x);
  };

  return {
    name: 'onednn',
    addon,
    elementwise: hasElementwise(addon) ? nativeElementwiseKernels(addon) : undefined,
    impl: (op, g) => {
      const c = croppedGeom(g) ?? g;
      const geom = geomOf(c);
      const layout =
        layoutOpt === 'auto'
          ? chosen.get(`${OP[op]}:${geom.join(',')}`) ?? defaultLayout(OP[op], c)
          : layoutOpt === 'default'
            ? defaultLayout(OP[op], c)
            : LAYOUTS[layoutOpt];
      return addon.impl(OP[op], layout, geom);
    },
    conv3d(x, w, g, out) {
      checkLength('x', x, inputLength(g));
      checkLength('w', w, weightLength(g));
      return withCrop(g, x, (gc, xc) => exec(OP.forward, gc, xc, w, outputLength(gc), out));
    },
    conv3dBackwardData(dy, w, g, out) {
      checkLength('dy', dy, outputLength(g));
      checkLength('w', w, weightLength(g));
      const c = croppedGeom(g);
      if (!c) return exec(OP.backwardData, g, dy, w, inputLength(g), out);
      if (out) checkLength('out', out, inputLength(g));
      return cornerCopy(exec(OP.backwardData, c, dy, w, inputLength(c)), c, g, false, out);
    },
    conv3dBackwardFilter(x, dy, g, out) {
      checkLength('x', x, inputLength(g));
      checkLength('dy', dy, outputLength(g));
      return withCrop(g, x, (gc, xc) => exec(OP.backwardFilter, gc, xc, dy, weightLength(gc), out));
    },
  };
}
