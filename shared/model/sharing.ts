/**
 * Which parameters travel, decided by part and layer type (never by substrings of names).
 */
import type { Plan } from '../plan/schema.ts';
import type { TensorBundle } from '../tensors/bundle.ts';
import { makeBundle } from '../tensors/bundle.ts';
import type { ModelArchitecture, ParamInfo } from './types.ts';

export function sharedParams(arch: ModelArchitecture, share: Plan['share']): ParamInfo[] {
  return arch.params().filter((p) => share.parts.includes(p.part) && !share.keepLocal.includes(p.layerType));
}

export function localParams(arch: ModelArchitecture, share: Plan['share']): ParamInfo[] {
  const shared = new Set(sharedParams(arch, share).map((p) => p.name));
  return arch.params().filter((p) => !shared.has(p.name));
}

/** The subset of `bundle` named by `params`, in a new bundle (arrays are shared, not copied). */
export function pick(bundle: TensorBundle, params: readonly { name: string }[]): TensorBundle {
  return makeBundle(
    params.map((p) => {
      const t = bundle.get(p.name);
      if (!t) throw new Error(`tensor "${p.name}" missing from bundle`);
      return t;
    }),
  );
}

/** `base` with every tensor present in `overrides` replaced. */
export function merge(base: TensorBundle, overrides: TensorBundle): TensorBundle {
  return makeBundle([...base.values()].map((t) => overrides.get(t.name) ?? t));
}
