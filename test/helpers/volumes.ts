/** Small synthetic volumes for trainer tests: a noisy bright ball on a dark background. */
import { gaussian, mulberry32 } from '../../shared/util/random.ts';
import type { VolumeCase } from '../../shared/model/types.ts';

export function sphereCase(seed: number, size: number, noise: number, radius: readonly [number, number] = [2.5, 5]): VolumeCase {
  const rng = mulberry32(seed);
  const n = size ** 3;
  const image = new Float32Array(n);
  const label = new Uint8Array(n);
  const r = radius[0] + rng() * (radius[1] - radius[0]);
  const [cz, cy, cx] = [0, 1, 2].map(() => r + 1 + rng() * (size - 2 * r - 2));
  for (let z = 0; z < size; z++) {
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const i = (z * size + y) * size + x;
        const inside = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r;
        label[i] = inside ? 1 : 0;
        image[i] = (inside ? 1 : 0) + noise * gaussian(rng);
      }
    }
  }
  return { id: `case-${seed}`, shape: [size, size, size], image, label };
}
