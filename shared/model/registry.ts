import type { Plan } from '../plan/schema.ts';
import { createTiny3d } from './tiny3d.ts';
import type { ModelArchitecture } from './types.ts';

/** The architecture a plan's `model` section names. The Med3D encoder registers here next to the demo net. */
export function architectureFor(model: Plan['model']): ModelArchitecture {
  switch (model.architecture) {
    case 'tiny3d':
      return createTiny3d({ patch: [...model.patch] as [number, number, number], numClasses: model.numClasses, width: model.width });
  }
}
