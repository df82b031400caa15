/**
 * A ComputeDevice over another one whose buffers are opaque handles: the graph cannot read their values except
 * through download(), and every upload and download is counted. A training step on it proves which values
 * cross between host and device, as they would to a GPU.
 */
import type { ComputeDevice } from '../../shared/engine/device.ts';

/** A device buffer as the graph sees it: no values, no length, nothing to index. */
export class OpaqueBuffer {
  readonly #brand = true;
  isOpaque(): boolean {
    return this.#brand;
  }
}

export interface TransferCounts {
  uploads: number;
  uploadedValues: number;
  downloads: number;
  downloadedValues: number;
}

export function countingDevice<B, S>(inner: ComputeDevice<B, S>): { device: ComputeDevice<OpaqueBuffer, S>; counts: TransferCounts; reset(): void } {
  const counts: TransferCounts = { uploads: 0, uploadedValues: 0, downloads: 0, downloadedValues: 0 };
  const real = new WeakMap<OpaqueBuffer, B>();
  const wrap = (b: B): OpaqueBuffer => {
    const h = new OpaqueBuffer();
    real.set(h, b);
    return h;
  };
  const un = (h: OpaqueBuffer): B => {
    const b = real.get(h);
    if (b === undefined) throw new Error('counting device: not one of my buffers');
    return b;
  };
  const opt = (h: OpaqueBuffer | undefined) => (h === undefined ? undefined : un(h));
  const optWrap = (b: B | undefined) => (b === undefined ? undefined : wrap(b));
  const i = inner;
  const device: ComputeDevice<OpaqueBuffer, S> = {
    name: `counting ${inner.name}`,
    alloc: (n, p) => wrap(i.alloc(n, p)),
    upload(src, p) {
      counts.uploads++;
      counts.uploadedValues += src.length;
      // A copy: the host keeps its array, the device its own memory, as across a bus.
      return wrap(i.upload(new Float32Array(src), p));
    },
    download(h, dst) {
      counts.downloads++;
      const r = new Float32Array(i.download(un(h)));
      counts.downloadedValues += r.length;
      if (!dst) return r;
      dst.set(r);
      return dst;
    },
    length: (h) => i.length(un(h)),
    view: (h, o, n) => wrap(i.view(un(h), o, n)),
    fill: (h, v) => i.fill(un(h), v),
    copy: (h) => wrap(i.copy(un(h))),
    free: (h) => i.free(un(h)),
    recycle: () => i.recycle(),
    conv3d: (x, w, g) => wrap(i.conv3d(un(x), un(w), g)),
    conv3dBackwardData: (dy, w, g) => wrap(i.conv3dBackwardData(un(dy), un(w), g)),
    conv3dBackwardFilterAdd: (x, dy, g, gw) => i.conv3dBackwardFilterAdd(un(x), un(dy), g, un(gw)),
    batchNormTrain(x, C, ga, be, rm, rv, mo, eps, relu) {
      const r = i.batchNormTrain(un(x), C, un(ga), un(be), un(rm), un(rv), mo, eps, relu);
      return { y: wrap(r.y), saved: r.saved };
    },
    batchNormEval(x, C, ga, be, rm, rv, eps, relu) {
      const r = i.batchNormEval(un(x), C, un(ga), un(be), un(rm), un(rv), eps, relu);
      return { y: wrap(r.y), saved: r.saved };
    },
    batchNormBackward: (x, dy, C, s, ga, y, bs, want, gg, gb) => optWrap(i.batchNormBackward(un(x), un(dy), C, s, un(ga), opt(y), bs, want, opt(gg), opt(gb))),
    groupNormForward(x, n, C, G, ga, be, eps, relu) {
      const r = i.groupNormForward(un(x), n, C, G, un(ga), un(be), eps, relu);
      return { y: wrap(r.y), saved: r.saved };
    },
    groupNormBackward: (x, dy, n, C, G, s, ga, ro, want, gg, gb) => optWrap(i.groupNormBackward(un(x), un(dy), n, C, G, s, un(ga), opt(ro), want, opt(gg), opt(gb))),
    relu: (x) => wrap(i.relu(un(x))),
    reluBackward: (y, dy) => wrap(i.reluBackward(un(y), un(dy))),
    add: (a, b, relu) => wrap(i.add(un(a), un(b), relu)),
    addInto: (d, s) => i.addInto(un(d), un(s)),
    maxPool(x, shape) {
      const r = i.maxPool(un(x), shape);
      return { y: wrap(r.y), saved: r.saved, shape: r.shape };
    },
    maxPoolBackward: (dy, s, shape) => wrap(i.maxPoolBackward(un(dy), s, shape)),
    concat: (a, Ca, b, Cb) => wrap(i.concat(un(a), Ca, un(b), Cb)),
    split(y, Ca, Cb, wa, wb) {
      const r = i.split(un(y), Ca, Cb, wa, wb);
      return { a: optWrap(r.a), b: optWrap(r.b) };
    },
    biasAdd: (y, C, b) => i.biasAdd(un(y), C, un(b)),
    biasGradAdd: (gb, dy, C) => i.biasGradAdd(un(gb), un(dy), C),
    shortcutA: (x, shape, oc, s) => wrap(i.shortcutA(un(x), shape, oc, s)),
    shortcutABackward: (dy, shape, oc, s) => wrap(i.shortcutABackward(un(dy), shape, oc, s)),
    segmentationLoss(z, t, C, w) {
      const r = i.segmentationLoss(un(z), un(t), C, opt(w));
      return { loss: wrap(r.loss), grad: wrap(r.grad) };
    },
    adamStep: (w, g, m, v, ...rest) => i.adamStep(un(w), un(g), un(m), un(v), ...rest),
    sgdStep: (w, g, b, ...rest) => i.sgdStep(un(w), un(g), un(b), ...rest),
  };
  return {
    device,
    counts,
    reset() {
      counts.uploads = counts.uploadedValues = counts.downloads = counts.downloadedValues = 0;
    },
  };
}
