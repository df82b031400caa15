import type { Plan } from '../plan/schema.ts';
import { createMed3d } from './med3d.ts';
import { createTiny3d } from './tiny3d.ts';
import type { ModelArchitecture } from './types.ts';

/** The architecture a plan's `model` section names. */
export function architectureFor(model: Plan['model']): ModelArchitecture {
  const patch = [...model.patch] as [number, number, number];
  switch (model.architecture) {
    case 'tiny3d':
      return createTiny3d({ patch, numClasses: model.numClasses, width: model.width });
    case 'med3d':
      return createMed3d({
        depth: model.depth,
        shortcut: model.shortcut,
        widthMultiplier: model.widthMultiplier,
        patch,
        head:
          model.head === 'classification'
            ? { kind: 'classification', numClasses: model.numClasses, dropout: model.dropout }
            : { kind: model.head, numClasses: model.numClasses, channels: model.headChannels },
        norm: model.norm,
        normGroups: model.normGroups,
        ...(model.inputChannels !== undefined ? { inChannels: model.inputChannels } : {}),
        ...(model.inference ? { inference: model.inference } : {}),
      });
  }
}
