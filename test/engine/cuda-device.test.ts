/**
 * The CUDA device without a GPU: it is refused with a reason and nothing throws — a missing addon says it was not
 * built (and, when the install left its one line, why); a built addon on a machine without a usable GPU says so.
 */
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CUDA_ADDON_PATH, loadCudaDevice } from '../../shared/engine/cuda-device.ts';

describe('CUDA device without a GPU', () => {
  it('a missing addon is "not built", with how to build it', () => {
    const r = loadCudaDevice({ addonPath: join(import.meta.dirname, 'no-such-addon.node') });
    expect(r).toEqual({ reason: expect.stringMatching(/^not built \(.+\); build with npm run build:native where nvcc and cuDNN are installed$/) });
  });

  it('the addon at its install path is refused with its reason on this machine: not built, or built without a usable GPU', () => {
    const r = loadCudaDevice();
    if (existsSync(CUDA_ADDON_PATH)) expect(r).toEqual({ reason: expect.stringMatching(/^built, but no usable GPU: .+/) });
    else expect(r).toEqual({ reason: expect.stringMatching(/^not built \(.+\)/) });
  });
});
