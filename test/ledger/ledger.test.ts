import { afterAll, describe, expect, it } from 'vitest';
import { generateKeyPairSync, createPublicKey, type KeyObject } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'nats';
import { ContributionLedger, FileLedgerBackend, JetStreamLedgerBackend, ledgerRecordFor, ledgerStreamNames, readLedgerFile } from '../../coordinator/ledger/ledger.ts';
import { canonicalJson, entryHash, signedBytes, verifyChain, type LedgerEntry } from '../../coordinator/ledger/chain.ts';
import { rawPublicKey, signManifest } from '../../shared/security/site-identity.ts';
import { CoordinatorHome } from '../../coordinator/home.ts';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { auditVerify } from '../../cli/audit.ts';
import { startNats, type NatsServer } from '../helpers/nats.ts';

const FED = 'fed-test';
const hex = (i: number) => i.toString(16).padStart(64, '0');

function keys(): { priv: KeyObject; pub: Buffer } {
  const { privateKey } = generateKeyPairSync('ed25519');
  return { priv: privateKey, pub: rawPublicKey(createPublicKey(privateKey)) };
}

async function fileLedger(n: number, key: KeyObject): Promise<{ path: string; ledger: ContributionLedger }> {
  const path = join(mkdtempSync(join(tmpdir(), 'medfl-ledger-')), 'ledger.jsonl');
  const ledger = await ContributionLedger.open(new FileLedgerBackend(path), { federation: FED, signingKey: key });
  for (let i = 1; i <= n; i++) await ledger.append({ round: Math.ceil(i / 2), site: `site-${i % 2 ? 'a' : 'b'}`, updateHash: hex(i), samples: 10 * i, strategy: 'fedavg' });
  return { path, ledger };
}

/** A round with one accepted update from `site`, closed: what the coordinator's store holds after it. */
function acceptAndClose(store: CoordinatorStore, round: number, site: string, sha256: string): void {
  store.openRound({ round, baseModelHash: hex(1000 + round), selected: [site], openedAt: round, deadlineAt: round + 1 });
  store.insertUpdate({ updateId: `u-${round}-${site}`, round, site, numSamples: round, sha256, path: `/u/${round}`, sizeBytes: 1, acceptedAt: round });
  store.closeRound(round, { hash: hex(2000 + round), path: `/m/${round}`, round, sizeBytes: 1, createdAt: round });
}

const check = (lines: string[], pub: Buffer, extra: { expectHead?: { seq: number; hash: string } } = {}) => verifyChain(lines, { coordinatorPublicKey: pub, federation: FED, ...extra });

describe('contribution ledger', () => {
  const k = keys();

  it('a ledger as written verifies; entries are canonical JSON, fsync-appended lines', async () => {
    const { path } = await fileLedger(5, k.priv);
    const lines = readLedgerFile(path);
    expect(lines).toHaveLength(5);
    const r = check(lines, k.pub);
    expect(r.problems).toEqual([]);
    expect(r.entries.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5]);
    expect(lines[0]).toBe(canonicalJson(JSON.parse(lines[0]!)));
  });

  it('detects a changed value (with or without the hash recomputed)', async () => {
    const { path } = await fileLedger(5, k.priv);
    const lines = readLedgerFile(path);
    const e = JSON.parse(lines[2]!) as LedgerEntry;
    const changed = [...lines];
    changed[2] = canonicalJson({ ...e, samples: e.samples * 100 });
    const r1 = check(changed, k.pub);
    expect(r1.ok).toBe(false);
    expect(r1.problems.map((p) => [p.seq, p.problem])).toEqual([[3, expect.stringMatching(/do not hash/)]]);
    // An editor who recomputes the hash breaks the signature and the next entry's link.
    const { hash: _h, sig: _s, ...body } = { ...e, samples: e.samples * 100 };
    const rehashed = [...lines];
    rehashed[2] = canonicalJson({ ...body, hash: entryHash(body), sig: e.sig });
    const r2 = check(rehashed, k.pub);
    expect(r2.problems.map((p) => p.seq)).toEqual([3, 4]);
    expect(r2.problems[0]!.problem).toMatch(/signature/);
    expect(r2.problems[1]!.problem).toMatch(/does not link/);
  });

  it('detects a removed entry and swapped entries', async () => {
    const { path } = await fileLedger(5, k.priv);
    const lines = readLedgerFile(path);
    const removed = lines.filter((_, i) => i !== 1);
    const r1 = check(removed, k.pub);
    expect(r1.ok).toBe(false);
    expect(r1.problems.some((p) => /sequence number 3 where 2/.test(p.problem))).toBe(true);
    const swapped = [lines[0]!, lines[2]!, lines[1]!, lines[3]!, lines[4]!];
    const r2 = check(swapped, k.pub);
    expect(r2.ok).toBe(false);
    expect(r2.problems.filter((p) => /does not link/.test(p.problem)).length).toBeGreaterThanOrEqual(2);
  });

  it('detects an appended forged entry, even one correctly chained and hashed', async () => {
    const { path } = await fileLedger(3, k.priv);
    const lines = readLedgerFile(path);
    const last = JSON.parse(lines[2]!) as LedgerEntry;
    const body = { v: 1 as const, seq: 4, federation: FED, at: new Date().toISOString(), round: 9, site: 'site-a', updateHash: hex(99), samples: 1_000_000, strategy: 'fedavg', prev: last.hash };
    const hash = entryHash(body);
    const forger = keys();
    const forged = canonicalJson({ ...body, hash, sig: signManifest(forger.priv, signedBytes(hash)).toString('base64') });
    const r = check([...lines, forged], k.pub);
    expect(r.problems).toEqual([expect.objectContaining({ seq: 4, problem: expect.stringMatching(/signature does not verify/) })]);
  });

  it('detects entries cut off the end against a head seen earlier', async () => {
    const { path } = await fileLedger(4, k.priv);
    const lines = readLedgerFile(path);
    const head = check(lines, k.pub).head;
    expect(check(lines.slice(0, 3), k.pub).ok).toBe(true); // the chain alone cannot tell
    const r = check(lines.slice(0, 3), k.pub, { expectHead: head });
    expect(r.ok).toBe(false);
    expect(r.problems[0]!.problem).toMatch(/cut off the end/);
  });

  it('continues the chain after a restart and records an update only once', async () => {
    const { path, ledger } = await fileLedger(2, k.priv);
    expect(await ledger.append({ round: 1, site: 'site-a', updateHash: hex(1), samples: 10, strategy: 'fedavg' })).toBeUndefined();
    const reopened = await ContributionLedger.open(new FileLedgerBackend(path), { federation: FED, signingKey: k.priv });
    expect(reopened.headSeq).toBe(2);
    const e = await reopened.append({ round: 2, site: 'site-c', updateHash: hex(7), samples: 5, strategy: 'median' });
    expect(e?.seq).toBe(3);
    expect(check(readLedgerFile(path), k.pub).ok).toBe(true);
  });

  it('an append reported as failed but stored after all (a lost ack) does not break the chain', async () => {
    const stored: string[] = [];
    let failNext = false;
    const flaky = {
      describe: () => 'memory',
      load: async () => [...stored],
      append: async (line: string) => {
        stored.push(line);
        if (failNext) {
          failNext = false;
          throw new Error('ack timed out');
        }
      },
      close: async () => undefined,
    };
    const ledger = await ContributionLedger.open(flaky, { federation: FED, signingKey: k.priv });
    await ledger.append({ round: 1, site: 'site-a', updateHash: hex(1), samples: 1, strategy: 'fedavg' });
    failNext = true;
    expect((await ledger.append({ round: 1, site: 'site-b', updateHash: hex(2), samples: 1, strategy: 'fedavg' }))?.seq).toBe(2);
    await ledger.append({ round: 2, site: 'site-a', updateHash: hex(3), samples: 1, strategy: 'fedavg' });
    const r = check(stored, k.pub);
    expect(r.problems).toEqual([]);
    expect(r.entries.map((e) => e.seq)).toEqual([1, 2, 3]);
  });

  it('turns update.accepted and model.rolled_back events into records, numeric extras as metrics', async () => {
    const path = join(mkdtempSync(join(tmpdir(), 'medfl-ledger-')), 'ledger.jsonl');
    const ledger = await ContributionLedger.open(new FileLedgerBackend(path), { federation: FED, signingKey: k.priv });
    const accepted = ledgerRecordFor({ type: 'update.accepted', federation: FED, at: '', round: 1, site: 'site-a', samples: 12, updateHash: hex(5), norm: 0.5 }, 'trimmed-mean+fedyogi');
    expect(ledgerRecordFor({ type: 'update.rejected', federation: FED, at: '', round: 1, site: 'site-b', reason: 'x' }, 'fedavg')).toBeUndefined();
    expect(() => ledgerRecordFor({ type: 'update.accepted', federation: FED, at: '', round: 1, site: 'site-b' }, 'fedavg')).toThrow(/without round, site, samples and updateHash/);
    const rollback = ledgerRecordFor({ type: 'model.rolled_back', federation: FED, at: '', round: 0, fromModel: hex(8), toModel: hex(9), failedRound: 2, rollbackId: 'r-1' }, 'fedavg');
    await ledger.append(accepted!);
    await ledger.append(rollback!);
    await ledger.close();
    const r = check(readLedgerFile(path), k.pub);
    expect(r.ok).toBe(true);
    expect(r.entries).toEqual([
      expect.objectContaining({ site: 'site-a', samples: 12, strategy: 'trimmed-mean+fedyogi', metrics: { norm: 0.5 } }),
      expect.objectContaining({ site: '', samples: 0, strategy: 'rollback', updateHash: hex(9), rollback: { id: 'r-1', fromModel: hex(8), toModel: hex(9), failedRound: 2 } }),
    ]);
  });

  it('medfl audit verify reads a coordinator directory and fails on a tampered ledger', async () => {
    const dir = join(mkdtempSync(join(tmpdir(), 'medfl-audit-')), 'coord');
    const home = await CoordinatorHome.init(dir, { hosts: ['localhost'] });
    // No store, nothing to say which entries must be there: not passed as complete.
    expect((await auditVerify({ dir })).text).toMatch(/completeness NOT CHECKED/);
    const store = new CoordinatorStore(home.dbPath);
    for (let i = 1; i <= 3; i++) acceptAndClose(store, i, 'site-a', hex(i));
    store.close();
    const ledger = await ContributionLedger.open(new FileLedgerBackend(join(dir, 'ledger.jsonl')), { federation: home.config().federationId, signingKey: home.signingKey() });
    for (let i = 1; i <= 3; i++) await ledger.append({ round: i, site: 'site-a', updateHash: hex(i), samples: i, strategy: 'fedavg' });
    const ok = await auditVerify({ dir });
    expect(ok.ok).toBe(true);
    expect(ok.text).toMatch(/ledger OK: 3 entries/);
    expect(ok.text).toMatch(/completeness OK: each of the 3 accepted update\(s\)/);
    const head = /head (\d+:[0-9a-f]{64})/.exec(ok.text)![1]!;
    // Cut the last entry off: the chain alone still verifies; the store and the head printed earlier do not.
    const full = readFileSync(join(dir, 'ledger.jsonl'), 'utf8');
    writeFileSync(join(dir, 'ledger.jsonl'), full.split('\n').slice(0, 2).join('\n') + '\n');
    const short = await auditVerify({ dir });
    expect(short.ok).toBe(false);
    expect(short.text).toMatch(/ledger OK: 2 entries/);
    expect(short.text).toMatch(/round 3, site site-a: accepted update 000000000000… has no ledger entry \(a gap/);
    const cut = await auditVerify({ dir, expectHead: head });
    expect(cut.ok).toBe(false);
    expect(cut.text).toMatch(/cut off the end/);
    writeFileSync(join(dir, 'ledger.jsonl'), full);
    await expect(auditVerify({ dir, expectHead: 'nonsense' })).rejects.toThrow(/SEQ:SHA256HEX/);
    const lines = readFileSync(join(dir, 'ledger.jsonl'), 'utf8').replace('"samples":2', '"samples":200');
    writeFileSync(join(dir, 'ledger.jsonl'), lines);
    const bad = await auditVerify({ dir });
    expect(bad.ok).toBe(false);
    expect(bad.text).toMatch(/ledger BROKEN: 1 problem/);
    expect(bad.text).toMatch(/BAD: contents do not hash/);
  });
});

describe('contribution ledger on JetStream', () => {
  let nats: NatsServer | undefined;
  afterAll(async () => nats?.stop());

  it('appends to a stream, continues after reconnecting, and a removed message is detected', async () => {
    nats = await startNats();
    const k = keys();
    const backend = await JetStreamLedgerBackend.connect(nats.url, FED);
    const ledger = await ContributionLedger.open(backend, { federation: FED, signingKey: k.priv });
    for (let i = 1; i <= 3; i++) await ledger.append({ round: i, site: 'site-a', updateHash: hex(i), samples: i, strategy: 'fedavg' });
    await ledger.close();
    const again = await ContributionLedger.open(await JetStreamLedgerBackend.connect(nats.url, FED), { federation: FED, signingKey: k.priv });
    expect(again.headSeq).toBe(3);
    await again.append({ round: 4, site: 'site-b', updateHash: hex(4), samples: 4, strategy: 'fedavg' });
    const lines = await again.lines();
    expect(check(lines, k.pub).ok).toBe(true);
    expect(lines).toHaveLength(4);
    // Tampering from outside, as anyone with access to the NATS server could: erase message 2 of the stream.
    const nc = await connect({ servers: nats.url });
    expect(await (await nc.jetstreamManager()).streams.deleteMessage(ledgerStreamNames(FED).stream, 2, true)).toBe(true);
    await nc.close();
    const r = check(await again.backend.load(), k.pub);
    expect(r.ok).toBe(false);
    expect(r.problems.some((p) => p.line === 2 && /empty line/.test(p.problem))).toBe(true);
    await again.close();
  }, 60_000);
});
