/**
 * A named-tensor bundle: the unit that crosses the wire (as safetensors) and that trainers,
 * aggregators and stores exchange. Only float32 is used for weights today; the dtype field
 * is there so compressed encodings can come later without changing the seam.
 */
export type DType = 'F32';

export interface NamedTensor {
  readonly name: string;
  readonly dtype: DType;
  readonly shape: readonly number[];
  readonly data: Float32Array;
}

/** Ordered by name so two bundles with the same content serialise to the same bytes. */
export type TensorBundle = ReadonlyMap<string, NamedTensor>;

export interface TensorSpec {
  readonly name: string;
  readonly shape: readonly number[];
  readonly dtype: DType;
}

export function elementCount(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function makeBundle(tensors: Iterable<NamedTensor>): TensorBundle {
  const sorted = [...tensors].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const out = new Map<string, NamedTensor>();
  for (const t of sorted) {
    if (out.has(t.name)) throw new Error(`duplicate tensor name "${t.name}" in bundle`);
    if (elementCount(t.shape) !== t.data.length) {
      throw new Error(`tensor "${t.name}": shape [${t.shape.join(',')}] needs ${elementCount(t.shape)} values, got ${t.data.length}`);
    }
    out.set(t.name, t);
  }
  return out;
}

export function bundleParameterCount(bundle: TensorBundle): number {
  let n = 0;
  for (const t of bundle.values()) n += t.data.length;
  return n;
}

export function specsOf(bundle: TensorBundle): TensorSpec[] {
  return [...bundle.values()].map((t) => ({ name: t.name, shape: [...t.shape], dtype: t.dtype }));
}

/**
 * First problem found when `bundle` is checked against `specs` (names, dtypes, shapes), or undefined when it matches
 * exactly. Only dtypes and shapes are read, so a file's header entries can be checked before its values are.
 */
export function checkAgainstSpecs(bundle: ReadonlyMap<string, Pick<NamedTensor, 'dtype' | 'shape'>>, specs: readonly TensorSpec[]): string | undefined {
  const expected = new Map(specs.map((s) => [s.name, s]));
  const unknown = [...bundle.keys()].filter((n) => !expected.has(n));
  if (unknown.length > 0) return `unknown tensor name(s): ${unknown.slice(0, 5).join(', ')}${unknown.length > 5 ? ', …' : ''}`;
  const missing = specs.filter((s) => !bundle.has(s.name)).map((s) => s.name);
  if (missing.length > 0) return `missing tensor(s): ${missing.slice(0, 5).join(', ')}${missing.length > 5 ? ', …' : ''}`;
  for (const s of specs) {
    const t = bundle.get(s.name)!;
    if (t.dtype !== s.dtype) return `tensor "${s.name}": dtype ${t.dtype}, expected ${s.dtype}`;
    if (t.shape.length !== s.shape.length || t.shape.some((d, i) => d !== s.shape[i])) {
      return `tensor "${s.name}": shape [${t.shape.join(',')}], expected [${s.shape.join(',')}]`;
    }
  }
  return undefined;
}

/** Name of the first tensor holding NaN or ±Inf, with the index, or undefined when all values are finite. */
export function findNonFinite(bundle: TensorBundle): string | undefined {
  for (const t of bundle.values()) {
    const d = t.data;
    for (let i = 0; i < d.length; i++) {
      const v = d[i];
      // v - v is NaN exactly when v is NaN or ±Inf; cheaper than Number.isFinite on hot loops.
      if (v - v !== 0) return `tensor "${t.name}" holds ${Number.isNaN(v) ? 'NaN' : v > 0 ? '+Inf' : '-Inf'} at index ${i}`;
    }
  }
  return undefined;
}
