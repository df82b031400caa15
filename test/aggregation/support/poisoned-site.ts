/**
 * A poisoned site, for the end-to-end test. On its round-1 task it downloads the global model like any site,
 * then uploads in turn: an update holding NaN, one with a wrong shape, one scaled far beyond any honest
 * step, and finally — once the honest sites' updates are stored — the sign-flipped, amplified mean of their
 * steps (an attacker who sees the others). Prints each ack as a JSON line; exits when the federation ends.
 * Usage: node --import tsx test/aggregation/support/poisoned-site.ts SITE_DIR COORD_DIR HONEST_COUNT MAX_NORM
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { SiteHome } from '../../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../../site-agent/transport/client.ts';
import { ModelCache } from '../../../site-agent/transport/model-cache.ts';
import { uploadOnce } from '../../../site-agent/transport/upload.ts';
import { CoordinatorStore } from '../../../coordinator/store/store.ts';
import { decodeSafetensors, encodeSafetensors } from '../../../shared/tensors/safetensors.ts';
import { makeBundle, type TensorBundle } from '../../../shared/tensors/bundle.ts';

const [siteDir, coordDir, honestCount, maxNormArg] = process.argv.slice(2);
const home = new SiteHome(siteDir);
const client = new FederationClient(home);
const cache = new ModelCache(join(siteDir, 'poison-cache'));
const map = (b: TensorBundle, f: (v: number, i: number, name: string) => number) =>
  makeBundle([...b.values()].map((t) => ({ ...t, data: Float32Array.from(t.data, (v, i) => f(v, i, t.name)) })));

async function attack(t: WireTask): Promise<void> {
  await cache.ensure(client, t.modelHash, t.modelSize);
  const base = decodeSafetensors(cache.read(t.modelHash)).bundle;
  const send = async (kind: string, b: TensorBundle, numSamples = 4) => {
    const ack = await uploadOnce(client, { updateId: `poison-${randomUUID()}`, taskId: t.taskId, round: t.round, baseModelHash: t.modelHash, numSamples, payload: encodeSafetensors(b) });
    process.stdout.write(`${JSON.stringify({ kind, accepted: ack.accepted, reason: ack.reason })}\n`);
  };
  const first = [...base.keys()][0];
  await send('nan', map(base, (v, i, n) => (n === first && i === 1 ? Number.NaN : v)));
  const [name0, t0] = [...base.entries()][0];
  await send('wrong-shape', makeBundle([...base.values()].filter((x) => x.name !== name0).concat([{ ...t0, shape: [...t0.shape, 1], data: t0.data }])));
  await send('scaled', map(base, (v, i) => v + 1000 * Math.sin(i)));
  // Wait for the honest updates, then push the model the opposite way.
  const store = new CoordinatorStore(join(coordDir, 'state.db'));
  while (store.updatesForRound(t.round).length < Number(honestCount)) await new Promise((r) => setTimeout(r, 200));
  const honest = store.updatesForRound(t.round).map((u) => decodeSafetensors(readFileSync(u.path)).bundle);
  store.close();
  const mean = map(base, (v, i, n) => honest.reduce((s, h) => s + h.get(n)!.data[i], 0) / honest.length - v);
  let norm = 0;
  for (const x of mean.values()) for (const v of x.data) norm += v * v;
  const factor = Math.min(3, (0.9 * Number(maxNormArg)) / Math.sqrt(norm));
  await send('sign-flipped', map(base, (v, i, n) => v - factor * mean.get(n)!.data[i]), 40);
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
