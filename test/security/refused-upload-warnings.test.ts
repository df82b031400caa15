/**
 * A site hammering the coordinator with uploads it refuses (issue 14, item 5): every refusal is answered, published
 * and counted in Prometheus, but the warn lines are collapsed per (site, reason) into one full line plus a count.
 */
import { afterAll, describe, expect, it } from 'vitest';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { addSite } from '../../coordinator/admin.ts';
import { startCoordinator, type RunningCoordinator } from '../../coordinator/coordinator.ts';
import { RefusalWarnings } from '../../coordinator/events/refusal-warnings.ts';
import { enrollSite } from '../../site-agent/enroll.ts';
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { TEST_PLAN } from '../helpers/federation.ts';
import { sampleValue, scrape } from '../helpers/prometheus.ts';

function captureLog(): { log: pino.Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const l of chunk.toString('utf8').split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      done();
    },
  });
  return { log: pino({ level: 'warn' }, sink), lines };
}

describe('RefusalWarnings', () => {
  it('logs the first refusal of a (site, reason) in full, counts the rest of its window into one summary', () => {
    const { log, lines } = captureLog();
    let now = 0;
    const w = new RefusalWarnings(log, { windowMs: 10_000, now: () => now });
    for (let i = 0; i < 1000; i++) w.refused('site-a', 'not_admitted', `round ${i} is not open`, { site: 'site-a' }, 'update rejected');
    w.refused('site-a', 'norm', 'too large', { site: 'site-a' }, 'update rejected');
    w.refused('site-b', 'not_admitted', 'closed', { site: 'site-b' }, 'update rejected');
    expect(lines.map((l) => l.msg)).toEqual(['update rejected', 'update rejected', 'update rejected']);
    now = 9_999;
    w.flush();
    expect(lines).toHaveLength(3);
    now = 10_000;
    w.flush();
    expect(lines).toHaveLength(4);
    expect(lines[3]).toMatchObject({ site: 'site-a', reason: 'not_admitted', refused: 999, seconds: 10, lastReason: 'round 999 is not open' });
    expect(lines[3]!.msg).toBe('999 more refused uploads from site site-a for reason not_admitted in the last 10 s (collapsed into one line)');
    // A new window starts with a full line again.
    w.refused('site-a', 'not_admitted', 'again', { site: 'site-a' }, 'update rejected');
    w.refused('site-a', 'not_admitted', 'again 2', { site: 'site-a' }, 'update rejected');
    expect(lines).toHaveLength(5);
    w.close();
    expect(lines).toHaveLength(6);
    expect(lines[5]).toMatchObject({ refused: 1 });
  });
});

describe('refused uploads against a real coordinator', () => {
  const work = mkdtempSync(join(tmpdir(), 'medfl-refusals-'));
  let coord: RunningCoordinator | undefined;
  let client: FederationClient | undefined;
  afterAll(async () => {
    client?.close();
    await coord?.stop();
    rmSync(work, { recursive: true, force: true });
  });

  it('400 refused uploads: every one answered and counted, two warn lines', async () => {
    const { log, lines } = captureLog();
    const coordDir = join(work, 'coordinator');
    const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'] });
    writeFileSync(home.planPath, TEST_PLAN({ rounds: 1, minSites: 1, gather: 0, deadline: 600 }));
    coord = await startCoordinator({ dir: coordDir, port: 0, host: '127.0.0.1', log, admin: { port: 0 } });
    const inv = addSite(coordDir, 'site-a', { ttlSeconds: 600 });
    await enrollSite({ coordinator: `localhost:${coord.port}`, token: inv.token, caFingerprint: inv.caFingerprint, dir: join(work, 'site-a') });
    client = new FederationClient(new SiteHome(join(work, 'site-a')));
    const stream = client.subscribeTasks([]);
    stream.on('error', () => undefined);
    const task = await new Promise<WireTask>((resolve) => stream.on('data', (t: WireTask) => t.kind === 'TRAIN' && resolve(t)));

    const N = 400;
    const refuse = async (i: number) => {
      const call = client!.openUpload(30_000);
      // A round that is not open: refused at the header, before any bytes are kept.
      await call.send({ header: { updateId: `hammer-${i}`, round: task.round + 7, taskId: task.taskId, baseModelHash: task.modelHash, totalSize: 8, sha256: '0'.repeat(64), numSamples: 4 } });
      return call.ack;
    };
    const acks = [];
    // One at a time, in pairs: the site's open-upload limit (2) is not what is tested here.
    for (let i = 0; i < N; i += 2) acks.push(...(await Promise.all([refuse(i), refuse(i + 1)])));
    expect(acks.every((a) => !a.accepted && /is not the open round/.test(a.reason))).toBe(true);

    const samples = await scrape(coord.admin!.url);
    expect(sampleValue(samples, 'medfl_updates_rejected_total', { site: 'site-a', reason: 'not_admitted' })).toBe(N);

    const rejected = lines.filter((l) => l.msg === 'update rejected');
    expect(rejected).toHaveLength(1);
    await coord.stop();
    coord = undefined;
    const summaries = lines.filter((l) => /more refused uploads from site site-a for reason not_admitted/.test(String(l.msg)));
    expect(summaries.reduce((n, l) => n + Number(l.refused), 0)).toBe(N - 1);
    expect(lines.filter((l) => /refused upload|update rejected/.test(String(l.msg))).length).toBeLessThanOrEqual(3);
  }, 120_000);
});
