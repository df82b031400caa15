/**
 * Med3D weights for export tests: arch.init with norm layers that are not the identity (γ, β and running statistics
 * drawn), so that a layout or naming slip in an exported file changes the outputs.
 */
import type { Med3dArchitecture } from '../../shared/model/med3d.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { gaussian, mulberry32 } from '../../shared/util/random.ts';

export function weightsWithDrawnNorms(arch: Med3dArchitecture, seed: number): TensorBundle {
  const rng = mulberry32(seed + 1);
  return makeBundle(
    [...arch.init(seed).values()].map((t) => {
      const d = new Float32Array(t.data);
      if (t.name.endsWith('.running_var')) for (let i = 0; i < d.length; i++) d[i] = 0.5 + rng();
      else if (t.name.endsWith('.running_mean')) for (let i = 0; i < d.length; i++) d[i] = 0.1 * gaussian(rng);
      else if (t.shape.length === 1 && !t.name.endsWith('.bias')) for (let i = 0; i < d.length; i++) d[i] = 0.8 + 0.4 * rng();
      else if (t.shape.length === 1) for (let i = 0; i < d.length; i++) d[i] = 0.1 * gaussian(rng);
      return { ...t, data: d };
    }),
  );
}
