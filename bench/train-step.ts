/**
 * Median time of one tiny3d training step (batch 2, Adam, Dice+CE) on the selected engine, through
 * Trainer.train() so batch sampling and augmentation are included.
 *
 *   node --import tsx bench/train-step.ts            # 24³ and 32³, width 4 and 8
 *   node --import tsx bench/train-step.ts --stock    # also tfjs's own tf.conv3d on the same backend, for comparison
 *   MEDFL_ENGINE=cpu node --import tsx bench/train-step.ts
 */
import { selectEngine, type EngineInfo } from '../shared/engine/select.ts';
import { createTfjsTrainer } from '../shared/model/tfjs-trainer.ts';
import { createTiny3d } from '../shared/model/tiny3d.ts';
import type { VolumeCase } from '../shared/model/types.ts';
import { gaussian, mulberry32 } from '../shared/util/random.ts';

const WARMUP = 2;
const MEASURED = Number(process.env.BENCH_STEPS ?? 9);

function syntheticCases(size: number, count: number): VolumeCase[] {
  const rng = mulberry32(size);
  return Array.from({ length: count }, (_, k) => {
    const n = size ** 3;
    const image = new Float32Array(n);
    const label = new Uint8Array(n);
    const r = size / 5;
    const c = size / 2;
    for (let z = 0; z < size; z++) {
      for (let y = 0; y < size; y++) {
        for (let x = 0; x < size; x++) {
          const i = (z * size + y) * size + x;
          label[i] = (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= r * r ? 1 : 0;
          image[i] = label[i] + 0.7 * gaussian(rng);
        }
      }
    }
    return { id: `case-${k}`, shape: [size, size, size], image, label };
  });
}

async function medianStepMs(engine: EngineInfo, size: number, width: number): Promise<{ median: number; min: number }> {
  const arch = createTiny3d({ patch: [size, size, size], width });
  const trainer = createTfjsTrainer(arch, engine);
  const times: number[] = [];
  let last = performance.now();
  await trainer.train({
    weights: arch.init(1),
    cases: syntheticCases(size, 4),
    steps: WARMUP + MEASURED,
    batchSize: 2,
    learningRate: 1e-3,
    seed: 1,
    onStep: (step) => {
      const now = performance.now();
      if (step >= WARMUP) times.push(now - last);
      last = now;
    },
  });
  times.sort((a, b) => a - b);
  return { median: times[Math.floor(times.length / 2)], min: times[0] };
}

const engine = await selectEngine();
console.log(`engine: ${engine.name}  (tried: ${engine.tried.map((t) => `${t.name}=${t.ok ? 'ok' : 'no'}`).join(', ')})`);
console.log(`tiny3d, batch 2, ${MEASURED} measured steps after ${WARMUP} warm-up; ms per step`);
console.log('patch  width   median     min');
for (const size of [24, 32]) {
  for (const width of [4, 8]) {
    const { median, min } = await medianStepMs(engine, size, width);
    console.log(`${`${size}³`.padEnd(6)} ${String(width).padStart(5)} ${median.toFixed(0).padStart(8)} ${min.toFixed(0).padStart(7)}`);
  }
}
if (process.argv.includes('--stock') && engine.name === 'cpu') {
  // The ops used for native engines (tf.conv3d etc.), run on the same cpu backend.
  const stock: EngineInfo = { ...engine, name: 'tfjs-node' };
  const { median, min } = await medianStepMs(stock, 24, 8);
  console.log(`24³        8 ${median.toFixed(0).padStart(8)} ${min.toFixed(0).padStart(7)}   (stock tf.conv3d on the cpu backend)`);
}
