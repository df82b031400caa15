/**
 * A hostile site, for test/e2e/hostile-site.test.ts. Enrolled like any site; on its round-1 task it downloads the
 * global model, then uploads (1) the model with one value set to 3e38 (4 samples): the overflow attack, and
 * (2) a modest, plausible update claiming 1,000,000 samples: the weight attack. Prints each ack as a JSON line
 * and exits when the federation ends.
 * Usage: node --import tsx test/e2e/support/hostile-site.ts SITE_DIR
 */
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { SiteHome } from '../../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../../site-agent/transport/client.ts';
import { ModelCache } from '../../../site-agent/transport/model-cache.ts';
import { uploadOnce } from '../../../site-agent/transport/upload.ts';
import { decodeSafetensors, encodeSafetensors } from '../../../shared/tensors/safetensors.ts';
import { makeBundle, type TensorBundle } from '../../../shared/tensors/bundle.ts';

const [siteDir] = process.argv.slice(2);
const client = new FederationClient(new SiteHome(siteDir));
const cache = new ModelCache(join(siteDir, 'hostile-cache'));
const map = (b: TensorBundle, f: (v: number, i: number, name: string) => number) =>
  makeBundle([...b.values()].map((t) => ({ ...t, data: Float32Array.from(t.data, (v, i) => f(v, i, t.name)) })));

async function attack(t: WireTask): Promise<void> {
  await cache.ensure(client, t.modelHash, t.modelSize);
  const base = decodeSafetensors(cache.read(t.modelHash)).bundle;
  const send = async (kind: string, b: TensorBundle, numSamples: number) => {
    const ack = await uploadOnce(client, { updateId: `hostile-${randomUUID()}`, taskId: t.taskId, round: t.round, baseModelHash: t.modelHash, numSamples, payload: encodeSafetensors(b) });
    process.stdout.write(`${JSON.stringify({ kind, accepted: ack.accepted, reason: ack.reason })}\n`);
  };
  const first = [...base.keys()][0];
  await send('overflow', map(base, (v, i, n) => (n === first && i === 0 ? 3e38 : v)), 4);
  await send('million-samples', map(base, (v, i) => v + 0.001 * Math.cos(i)), 1_000_000);
}

const stream = client.subscribeTasks([]);
let attacked = false;
stream.on('data', (t: WireTask) => {
  if (t.kind === 'FINISHED') {
    stream.cancel();
    client.close();
    process.exit(0);
  }
  if (t.kind !== 'TRAIN' || attacked) return;
  attacked = true;
  attack(t).catch((e: Error) => {
    process.stdout.write(`${JSON.stringify({ kind: 'error', reason: e.message })}\n`);
    process.exit(2);
  });
});
stream.on('error', () => undefined);
