/**
 * Encoded uploads through the real coordinator: sites send int8 deltas (as plan.compression asks in each task),
 * the receiver decodes them, and the round's model is the sample-weighted mean of the decoded weights.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { ModelCache } from '../../site-agent/transport/model-cache.ts';
import { float32Safetensors } from '../../shared/tensors/update-codec.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { encodeForUpload } from '../../site-agent/transport/upload.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { decodeUpdate, weightsOf } from '../../shared/tensors/update-codec.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { InprocFederation } from './inproc.ts';

const plan = [
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 1',
  'minSites: 2',
  'gatherSeconds: 0',
  'compression: { update: int8, delta: true }',
  // Two sites with 2 and 3 samples: the default maxWeightShare (0.5) would make that an unweighted mean.
  'aggregation: { maxWeightShare: 1 }',
  '',
].join('\n');

let f: InprocFederation | undefined;
let g: InprocFederation | undefined;
afterAll(async () => {
  await f?.close();
  await g?.close();
});

describe('compressed updates end to end', () => {
  it('int8 deltas are announced in the task, decoded on receipt, and averaged as weights; a refused try leaves nothing', async () => {
    f = await InprocFederation.create(plan, ['site-a', 'site-b']);
    const sites = f.connect(['site-a', 'site-b']);
    const sent: { bytes: Buffer; samples: number }[] = [];
    let base: TensorBundle | undefined;
    for (const [i, s] of sites.entries()) {
      const t = await f.task(s, 1);
      const settings = TaskSettingsSchema.parse(JSON.parse(t.settingsJson));
      expect(settings.compression).toEqual({ update: 'int8', delta: true, model: 'float32' });
      expect(settings.modelFile).toBeUndefined();
      base = f.model(t.modelHash);
      const trained = makeBundle([...base.values()].map((x) => ({ ...x, data: x.data.map((v, j) => v + 0.01 * Math.sin(j + i)) })));
      const raw = encodeSafetensors(trained);
      const bytes = encodeForUpload(raw, settings, () => encodeSafetensors(base!));
      expect(bytes.length).toBeLessThan(0.4 * raw.length); // a tiny model: the header is a good part of it
      if (i === 0) {
        // A poisoned first try (NaN in an int8 delta cannot even be encoded, so send float32 weights with a NaN):
        // refused with its reason, published as update.rejected, and the site may still send a good one.
        const bad = makeBundle([...trained.values()].map((x, k) => ({ ...x, data: k === 0 ? x.data.map((v, j) => (j === 2 ? Number.NaN : v)) : x.data })));
        const refused = await f.upload(s, t, encodeSafetensors(bad), 2);
        expect(refused.accepted).toBe(false);
        expect(refused.reason).toMatch(/non-finite values: .* NaN at index 2/);
        const ev = f.events.filter((e) => e.type === 'update.rejected');
        expect(ev).toHaveLength(1);
        expect(ev[0]).toMatchObject({ site: 'site-a', round: 1, reason: refused.reason });
        expect(f.coord!.store.updatesForRound(1)).toEqual([]);
      }
      const ack = await f.upload(s, t, bytes, 2 + i);
      expect(ack.accepted, ack.reason).toBe(true);
      sent.push({ bytes, samples: 2 + i });
    }
    await f.closedRounds(1);
    const result = f.model(f.coord!.store.listRounds()[0].resultModelHash!);
    const decoded = sent.map((x) => weightsOf(decodeUpdate(x.bytes), base!));
    for (const [name, t] of result) {
      for (let j = 0; j < t.data.length; j++) {
        const want = (2 * decoded[0].get(name)!.data[j] + 3 * decoded[1].get(name)!.data[j]) / 5;
        expect(t.data[j]).toBeCloseTo(want, 5);
      }
    }
  }, 30_000);

  it('a float16 model download: named in the task, served by hash, half the bytes, decoded within half precision', async () => {
    g = await InprocFederation.create(plan.replace('compression: { update: int8, delta: true }', 'compression: { model: float16 }'), ['site-a', 'site-b']);
    const [a] = g.connect(['site-a', 'site-b']);
    const t = await g.task(a, 1);
    const settings = TaskSettingsSchema.parse(JSON.parse(t.settingsJson));
    expect(settings.modelFile?.encoding).toBe('float16');
    expect(settings.modelFile!.hash).not.toBe(t.modelHash); // the round's identity stays the float32 version
    const cache = new ModelCache(join(g.work, 'cache-a'));
    const downloaded = await cache.ensure(a.client, settings.modelFile!.hash, settings.modelFile!.size);
    expect(downloaded).toBe(settings.modelFile!.size);
    expect(settings.modelFile!.size).toBeLessThan(0.6 * t.modelSize);
    const exact = g.model(t.modelHash);
    const got = decodeSafetensors(float32Safetensors(cache.read(settings.modelFile!.hash))).bundle;
    for (const [name, x] of exact) {
      for (let j = 0; j < x.data.length; j++) expect(Math.abs(got.get(name)!.data[j] - x.data[j])).toBeLessThanOrEqual(Math.abs(x.data[j]) * 2 ** -11 + 2 ** -24);
    }
  }, 30_000);
});
