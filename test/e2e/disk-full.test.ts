/**
 * Issue 15: a coordinator whose disk fills up. The coordinator here is wired like coordinator.ts (real store,
 * round engine, upload receiver, Federation handlers, token interceptor, TLS on 127.0.0.1), except that its store
 * is wrapped so that writes can fail with a genuine SQLITE_FULL (test/support/fillable-store.ts); the sites are
 * real site clients enrolled with a real coordinator first.
 *
 * Wanted: storage failures reach sites as UNAVAILABLE with the reason (never as an authentication failure), sites
 * keep and resend their update, the round deadline and the round close never kill the process, and everything
 * carries on by itself once space returns.
 */
import * as grpc from '@grpc/grpc-js';
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { pino } from 'pino';
import { InprocFederation, type ScriptedSite } from '../aggregation/inproc.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { ModelFiles } from '../../coordinator/models/model-store.ts';
import { RoundEngine } from '../../coordinator/rounds/round-engine.ts';
import { keyTaskSigner } from '../../coordinator/rounds/task-signer.ts';
import { strategyFromPlan } from '../../coordinator/aggregation/index.ts';
import { federationHandlers } from '../../coordinator/server/federation-service.ts';
import { UploadReceiver } from '../../coordinator/server/upload-receiver.ts';
import { createAuthInterceptor, type SiteDirectory } from '../../coordinator/auth/interceptor.ts';
import { InProcessBus, type FederationEvent } from '../../shared/events/bus.ts';
import { loadPlanFile } from '../../shared/plan/load.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { loadProto, SERVER_OPTIONS } from '../../shared/protocol/grpc.ts';
import { serverCredentials } from '../../shared/security/pki.ts';
import { safetensorsLayout, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { uploadOnce, uploadUpdate } from '../../site-agent/transport/upload.ts';
import type { WireTask } from '../../site-agent/transport/client.ts';
import { waitFor } from '../../cli/processes.ts';
import { fillableStore, type FillableStore } from '../support/fillable-store.ts';

const PLAN = [
  'model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }',
  'rounds: 3',
  'minSites: 2',
  'gatherSeconds: 0',
  'roundDeadlineSeconds: 10',
  '',
].join('\n');
const RETRY_MS = 200;

let f: InprocFederation;
let disk: FillableStore;
let real: CoordinatorStore;
let engine: RoundEngine;
let server: grpc.Server;
const logs: Array<Record<string, unknown>> = [];
const events: FederationEvent[] = [];
let a: ScriptedSite;
let b: ScriptedSite;

/** The coordinator of coordinator.ts, on `f`'s folder and port, with the store behind `disk`. */
async function startCoordinator(): Promise<void> {
  const home = new CoordinatorHome(f.coordDir);
  const federationId = home.config().federationId;
  const plan = loadPlanFile(home.planPath);
  const architecture = architectureFor(plan.model);
  real = new CoordinatorStore(home.dbPath);
  disk = fillableStore(real);
  const store = disk.store;
  const log = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line) as Record<string, unknown>) });
  const bus = new InProcessBus();
  bus.subscribe((e) => events.push(e));
  const models = new ModelFiles(home.modelsDir);
  const signingKey = home.signingKey();
  engine = new RoundEngine({
    store, models, plan, architecture, bus, federationId, log,
    strategy: strategyFromPlan(plan, { spillDir: join(home.updatesDir, '.spill') }),
    signTask: keyTaskSigner(signingKey),
    updatesDir: home.updatesDir,
    storageRetryMs: RETRY_MS,
  });
  const specs = engine.shared.map((p) => ({ name: p.name, shape: [...p.shape], dtype: p.dtype }));
  const layout = safetensorsLayout(specs);
  const receiver = new UploadReceiver(home.updatesDir, specs, 8 + layout.header.length + layout.dataBytes + 64 * 1024);
  const directory: SiteDirectory = {
    getSite(name) {
      const s = store.getSite(name);
      return s?.publicKey && s.state !== 'invited' ? { publicKeyRaw: s.publicKey, revoked: s.state === 'revoked' } : undefined;
    },
    consumeJti: (jti, exp) => store.consumeJti(jti, exp),
  };
  server = new grpc.Server({ ...SERVER_OPTIONS, interceptors: [createAuthInterceptor({ federationId, directory, log })] });
  server.addService(loadProto().Federation.service, federationHandlers({ store, models, engine, receiver, log }));
  await new Promise<number>((res, rej) => server.bindAsync(`127.0.0.1:${f.port}`, serverCredentials(home.serverCertificate()), (e, p) => (e ? rej(e) : res(p))));
  await engine.start();
}

/** A site's update: the round's model moved by a known per-site step. */
function step(base: TensorBundle, by: number): TensorBundle {
  return makeBundle([...base.values()].map((t) => ({ ...t, data: Float32Array.from(t.data, (v, j) => v + by * Math.sin(j + 1)) })));
}

const outgoing = (t: WireTask, update: TensorBundle) => ({ updateId: `u-${randomUUID()}`, taskId: t.taskId, round: t.round, baseModelHash: t.modelHash, numSamples: 4, payload: encodeSafetensors(update) });
const logged = (msg: RegExp) => logs.some((l) => typeof l.msg === 'string' && msg.test(l.msg));

beforeAll(async () => {
  f = await InprocFederation.create(PLAN, ['site-a', 'site-b']);
  await f.stop(); // enrolled for real; from here on the coordinator below serves the same folder and port
  await startCoordinator();
  [a, b] = f.connect(['site-a', 'site-b']);
});

afterAll(async () => {
  for (const s of f?.sites ?? []) s.close();
  engine?.stop();
  server?.forceShutdown();
  real?.close();
  await f?.close(); // the enrolment federation's folder, which the coordinator above served
});

describe('a coordinator on a full disk', () => {
  it('refuses site calls as UNAVAILABLE naming the storage fault, not as an authentication failure', async () => {
    await f.task(a, 1);
    disk.fill();
    const err = await a.client.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' }).then(
      () => undefined,
      (e: grpc.ServiceError) => e,
    );
    disk.empty();
    expect(err, 'the heartbeat went through on a full disk').toBeDefined();
    expect(grpc.status[err!.code]).toBe('UNAVAILABLE');
    expect(err!.details).toMatch(/database or disk is full/);
    expect(err!.details).toMatch(/try again later/);
    // Space is back: the same call works.
    await expect(a.client.heartbeat({ state: 'idle', progress: 0, taskId: '', engine: '' })).resolves.toMatchObject({ serverTimeMs: expect.any(Number) });
  });

  it("answers an upload it cannot store with UNAVAILABLE, and the site's retries get it in once space returns", async () => {
    const t = await f.task(a, 1);
    const update = step(f.model(t.modelHash), 0.01);
    // The small token-id rows still fit in the database's free pages; the update's row does not.
    disk.fill(['insertUpdate', 'insertUpdates']);
    const first = await uploadOnce(a.client, outgoing(t, update)).then(
      (ack) => ack,
      (e: grpc.ServiceError) => e,
    );
    expect('code' in first ? grpc.status[first.code] : `acknowledged: accepted=${String(first.accepted)} ${first.reason}`).toBe('UNAVAILABLE');
    expect((first as grpc.ServiceError).details).toMatch(/cannot store the update now .*database or disk is full/);
    expect(real.updatesForRound(1)).toEqual([]);

    // The site keeps the update and retries with backoff; an admin frees space a moment later.
    const sending = uploadUpdate(() => a.client, outgoing(t, update), undefined, { until: Date.now() + 60_000, maxBackoffMs: 400 });
    await waitFor(() => disk.refused >= 3, 20_000, 'a few refused tries');
    disk.empty();
    const ack = await sending;
    expect(ack.accepted, ack.reason).toBe(true);
    expect(real.updatesForRound(1).map((u) => u.site)).toEqual(['site-a']);
  });

  it('survives the round deadline on a full disk and fails the round once space returns', async () => {
    // site-b never reports: at the deadline round 1 has 1 of the 2 sites it needs and must be failed.
    disk.fill();
    const deadline = real.getRound(1)!.deadlineAt;
    await waitFor(() => Date.now() > deadline + 3 * RETRY_MS && logged(/failing round 1 failed; trying again later/), 30_000, 'the deadline on a full disk');
    // Still alive (an uncaught SQLITE_FULL would have ended this process), and nothing half-done is stored.
    expect(real.getRound(1)!.state).toBe('open');
    expect(events.some((e) => e.type === 'round.failed')).toBe(false);
    // While it waits, the round is closing: uploads are refused for what they are, and nothing is lost by that.
    expect(engine.storageFault?.error).toMatch(/database or disk is full/);
    disk.empty();
    await waitFor(() => real.getRound(1)?.state === 'failed', 10_000, 'round 1 to be failed once space returns');
    expect(real.getRound(1)!.note).toMatch(/deadline reached without quorum: 1 of 2/);
    await f.task(a, 2);
    await f.task(b, 2);
    expect(real.getRound(2)!.state).toBe('open');
  });

  it('closes a round whose commit hit a full disk, later, with the same aggregate', async () => {
    const ta = await f.task(a, 2);
    const tb = await f.task(b, 2);
    const base = f.model(ta.modelHash);
    const ua = step(base, 0.02);
    const ub = step(base, -0.01);
    expect((await uploadOnce(a.client, outgoing(ta, ua))).accepted).toBe(true);
    // The round-close transaction is what fails now (the model file itself still fits).
    disk.fill(['closeRound']);
    expect((await uploadOnce(b.client, outgoing(tb, ub))).accepted).toBe(true);
    await waitFor(() => disk.refused >= 2 && logged(/closing round 2 failed; trying again later/), 20_000, 'the close to fail on a full disk');
    expect(real.getRound(2)!.state).toBe('open');
    disk.empty();
    await waitFor(() => real.getRound(2)?.state === 'closed', 10_000, 'round 2 to close once space returns');
    // FedAvg of two equal-weight updates, computed again from the stored updates after the failed attempt.
    const result = f.model(real.getRound(2)!.resultModelHash!);
    for (const [name, t] of result) {
      for (let j = 0; j < t.data.length; j += 31) expect(t.data[j]).toBeCloseTo((ua.get(name)!.data[j] + ub.get(name)!.data[j]) / 2, 5);
    }
    expect(events.filter((e) => e.type === 'round.closed').map((e) => e.round)).toEqual([2]);
    expect(engine.storageFault).toBeUndefined();
    await f.task(a, 3);
  });
});
