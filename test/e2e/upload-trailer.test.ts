/**
 * The upload's SHA-256 in a trailer (FEATURES.uploadSha256Trailer), against the real coordinator over TLS:
 * a site uses it only after the coordinator named it in a heartbeat answer, the stored update carries the
 * trailer's hash, and a site that still believes in the feature after its coordinator was replaced by one
 * without it (an older version) sends the update again with the hash in the header, without losing it.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { WireAudit, type AuditedCall } from '../../site-agent/transport/wire-audit.ts';
import { uploadOnce } from '../../site-agent/transport/upload.ts';
import { FEATURES } from '../../shared/protocol/features.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';
import { waitFor } from '../../cli/processes.ts';
import { TEST_PLAN } from '../helpers/federation.ts';

let work: string;
let coordDir: string;
let coord: RunningCoordinator;
let port: number;
let client: FederationClient;
let auditPath: string;
const silent = pino({ level: 'silent' });
const idle = { state: 'idle', progress: 0, taskId: '', engine: '' };

/** The next TRAIN task on a fresh task stream (the old one ends with a coordinator restart). */
function nextTask(round: number): Promise<WireTask> {
  const stream = client.subscribeTasks([]);
  stream.on('error', () => undefined);
  return new Promise<WireTask>((resolve) =>
    stream.on('data', (t: WireTask) => {
      if (t.kind === 'TRAIN' && t.round === round) {
        stream.cancel();
        resolve(t);
      }
    }),
  );
}

function payloadFor(task: WireTask, seed: number): Buffer {
  const settings = TaskSettingsSchema.parse(JSON.parse(task.settingsJson));
  return encodeSafetensors(pick(architectureFor(settings.model).init(seed), settings.sharedTensors.map((name) => ({ name }))));
}

function uploadsOf(updateId: string): AuditedCall[] {
  return readFileSync(auditPath, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as AuditedCall)
    .filter((c) => c.method.endsWith('/UploadUpdate') && (c.messages[0] as { header?: { updateId?: string } }).header?.updateId === updateId);
}

const headerHash = (c: AuditedCall) => (c.messages[0] as { header: { sha256: string } }).header.sha256;
const trailerOf = (c: AuditedCall) => (c.messages.at(-1) as { trailer?: { sha256: string } }).trailer;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), 'medfl-trailer-'));
  coordDir = join(work, 'coordinator');
  const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
  writeFileSync(home.planPath, TEST_PLAN({ rounds: 2, minSites: 1, gather: 0 }));
  coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log: silent });
  port = coord.port;
  const inv = addSite(coordDir, 'site-a', { ttlSeconds: 600 });
  await enrollSite({ coordinator: `localhost:${port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, 'site-a') });
  auditPath = join(work, 'wire.jsonl');
  client = new FederationClient(new SiteHome(join(work, 'site-a')), { audit: new WireAudit(auditPath) });
});

afterAll(async () => {
  client?.close();
  await coord?.stop();
});

describe('the upload hash in a trailer', () => {
  it('is used once the coordinator offers it; the update is stored under the hash the trailer carried', async () => {
    expect(client.supports(FEATURES.uploadSha256Trailer)).toBe(false);
    const hb = await client.heartbeat(idle);
    expect(hb.features).toContain(FEATURES.uploadSha256Trailer);
    expect(client.supports(FEATURES.uploadSha256Trailer)).toBe(true);

    const task = await nextTask(1);
    const payload = payloadFor(task, 7);
    const ack = await uploadOnce(client, { updateId: 'trailer-round-1', taskId: task.taskId, round: 1, baseModelHash: task.modelHash, numSamples: 3, payload });
    expect(ack).toMatchObject({ accepted: true, duplicate: false });
    expect(coord.store.updatesForRound(1).map((u) => u.sha256)).toEqual([sha256Hex(payload)]);
    const [call] = uploadsOf('trailer-round-1');
    expect(headerHash(call)).toBe('');
    expect(trailerOf(call)).toEqual({ sha256: sha256Hex(payload) });
  });

  it('falls back to the hash in the header when the coordinator was replaced by one without the feature', async () => {
    await waitFor(() => coord.store.getRound(1)?.state === 'closed', 10_000, 'round 1 to close');
    await coord.stop();
    // Same data folder and port, but offering no features: it refuses an empty header hash as older versions do.
    coord = await startCoordinator({ dir: coordDir, port, host: '127.0.0.1', log: silent, features: [] });
    // No heartbeat since: the site still believes in the trailer.
    expect(client.supports(FEATURES.uploadSha256Trailer)).toBe(true);

    const task = await nextTask(2);
    const payload = payloadFor(task, 8);
    const ack = await uploadOnce(client, { updateId: 'trailer-round-2', taskId: task.taskId, round: 2, baseModelHash: task.modelHash, numSamples: 3, payload });
    expect(ack).toMatchObject({ accepted: true, duplicate: false });
    expect(client.supports(FEATURES.uploadSha256Trailer)).toBe(false);
    const calls = uploadsOf('trailer-round-2');
    expect(calls.map(headerHash)).toEqual(['', sha256Hex(payload)]);
    expect(trailerOf(calls[1])).toBeUndefined();
    expect(coord.store.updatesForRound(2).map((u) => u.sha256)).toEqual([sha256Hex(payload)]);

    const hb = await client.heartbeat(idle);
    expect(hb.features).toEqual([]);
    expect(client.supports(FEATURES.uploadSha256Trailer)).toBe(false);
  });
});
