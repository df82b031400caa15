/**
 * The optimiser state of a site's own parameters (its head, kept-local norms) as a safetensors file in the
 * site's local folder, so the next round's optimiser continues where this one stopped instead of restarting
 * Adam's moments and bias correction every round. Site-local like the tensors it belongs to: never sent.
 *
 * Layout: `<param>.exp_avg` (Adam's first moment or SGD's momentum buffer), `<param>.exp_avg_sq` (Adam's second
 * moment); metadata `format`, `kind` (adam | sgd) and `steps` (JSON: update count per parameter).
 */
import { makeBundle, type NamedTensor } from '../../shared/tensors/bundle.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import type { OptimizerSpec, OptimizerState, ParamOptimizerState } from '../../shared/model/optim.ts';

const FORMAT = 'medfl-optimizer-state/1';
const FIRST = '.exp_avg';
const SECOND = '.exp_avg_sq';

export function encodeOptimizerState(state: OptimizerState, kind: OptimizerSpec['kind']): Buffer {
  const tensors: NamedTensor[] = [];
  const steps: Record<string, number> = {};
  for (const [name, s] of state) {
    steps[name] = s.step;
    tensors.push({ name: name + FIRST, dtype: 'F32', shape: [s.m.length], data: s.m });
    if (s.v) tensors.push({ name: name + SECOND, dtype: 'F32', shape: [s.v.length], data: s.v });
  }
  return encodeSafetensors(makeBundle(tensors), { format: FORMAT, kind, steps: JSON.stringify(steps) });
}

/** The state and its optimiser kind; throws on a file that is not one of ours. */
export function decodeOptimizerState(bytes: Uint8Array): { kind: OptimizerSpec['kind']; state: OptimizerState } {
  const { bundle, metadata } = decodeSafetensors(bytes);
  if (metadata.format !== FORMAT) throw new Error(`not an optimiser state file (format ${JSON.stringify(metadata.format)})`);
  const kind = metadata.kind;
  if (kind !== 'adam' && kind !== 'sgd') throw new Error(`unknown optimiser kind ${JSON.stringify(kind)}`);
  const steps = JSON.parse(metadata.steps ?? '{}') as Record<string, unknown>;
  const state = new Map<string, ParamOptimizerState>();
  for (const [name, step] of Object.entries(steps)) {
    const m = bundle.get(name + FIRST);
    if (!m || typeof step !== 'number') throw new Error(`parameter ${name}: no first moment or no step count`);
    const v = bundle.get(name + SECOND);
    state.set(name, { step, m: m.data as Float32Array, ...(v ? { v: v.data as Float32Array } : {}) });
  }
  if (bundle.size !== [...state.values()].reduce((n, s) => n + (s.v ? 2 : 1), 0)) throw new Error('tensors without a step count');
  return { kind, state };
}
