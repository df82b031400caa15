/**
 * `medfl audit verify --dir D`: re-checks a coordinator's contribution ledger (hash chain, sequence,
 * coordinator signatures) and its completeness against the coordinator's store (ledger/completeness.ts), and
 * prints it as a table.
 * `medfl site ledger --dir S`: fetches the ledger from the coordinator, verifies it against the
 * coordinator key the site pinned at enrolment, and lists this site's entries; it remembers the head it
 * verified (`ledger-head.json`) so that a later ledger with entries cut off or rewritten is caught.
 * Both exit with status 1 when anything is wrong.
 */
import type { Command } from 'commander';
import Table from 'cli-table3';
import * as grpc from '@grpc/grpc-js';
import { createPublicKey } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { CoordinatorHome } from '../coordinator/home.ts';
import { verifyChain, type ChainReport, type LedgerEntry } from '../coordinator/ledger/chain.ts';
import { checkCompleteness, type CompletenessReport } from '../coordinator/ledger/completeness.ts';
import { CoordinatorStore } from '../coordinator/store/store.ts';
import { FileLedgerBackend, JetStreamLedgerBackend, LEDGER_FILE, type LedgerBackend } from '../coordinator/ledger/ledger.ts';
import { rawPublicKey } from '../shared/security/site-identity.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import { SiteHome } from '../site-agent/home.ts';
import { PRIVACY_SPENT_FILE, SitePolicy } from '../site-agent/policy.ts';
import { SiteConnection } from '../site-agent/transport/connection.ts';

export const LEDGER_HEAD_FILE = 'ledger-head.json';
const HeadSchema = z.object({ seq: z.number().int().min(0), hash: z.string() });

export function parseHead(s: string): { seq: number; hash: string } {
  const m = /^(\d+):([0-9a-f]{64})$/.exec(s.trim());
  if (!m) throw new Error(`--expect-head must look like SEQ:SHA256HEX (as printed by an earlier verify), got '${s}'`);
  return { seq: Number(m[1]), hash: m[2]! };
}

export function ledgerTable(entries: readonly LedgerEntry[], report: ChainReport, notes: ReadonlyMap<number, string> = new Map()): string {
  const bad = new Map<number, string[]>();
  for (const p of report.problems) if (p.seq !== undefined) bad.set(p.seq, [...(bad.get(p.seq) ?? []), p.problem]);
  const t = new Table({ head: ['seq', 'round', 'site', 'samples', 'strategy', 'update', 'recorded', 'check'] });
  for (const e of entries) {
    const problems = bad.get(e.seq);
    const note = notes.get(e.seq);
    t.push([e.seq, e.round, e.site, e.samples, e.strategy, e.updateHash.slice(0, 12), e.at.replace('T', ' ').slice(0, 19), problems ? `BAD: ${problems.join('; ')}` : note ? `ok (${note})` : 'ok']);
  }
  return t.toString();
}

export function summary(report: ChainReport): string {
  if (report.ok) return `ledger OK: ${report.entries.length} entr${report.entries.length === 1 ? 'y' : 'ies'}, head ${report.head.seq}:${report.head.hash}`;
  return [`ledger BROKEN: ${report.problems.length} problem(s)`, ...report.problems.map((p) => `  line ${p.line}${p.seq !== undefined ? ` (seq ${p.seq})` : ''}: ${p.problem}`)].join('\n');
}

/** Verifies a coordinator directory's ledger (its file, or its JetStream stream with --nats). */
export async function auditVerify(o: { dir: string; nats?: string; expectHead?: string }): Promise<{ ok: boolean; text: string }> {
  const home = new CoordinatorHome(o.dir);
  const c = home.config();
  const key = rawPublicKey(createPublicKey(home.signingKey()));
  const backend: LedgerBackend = o.nats ? await JetStreamLedgerBackend.connect(o.nats, c.federationId) : new FileLedgerBackend(join(o.dir, LEDGER_FILE));
  try {
    const lines = await backend.load();
    const report = verifyChain(lines, { coordinatorPublicKey: key, federation: c.federationId, expectHead: o.expectHead ? parseHead(o.expectHead) : undefined });
    // The chain cannot show an entry that was never appended: the store says what must be there.
    const complete = existsSync(home.dbPath) ? withStore(home.dbPath, (store) => checkCompleteness(report.entries, store)) : undefined;
    const text = [backend.describe(), ledgerTable(report.entries, report, complete?.notes), summary(report), completenessSummary(complete)].join('\n');
    return { ok: report.ok && (complete?.ok ?? false), text };
  } finally {
    await backend.close();
  }
}

function withStore<T>(path: string, fn: (store: CoordinatorStore) => T): T {
  const store = new CoordinatorStore(path);
  try {
    return fn(store);
  } finally {
    store.close();
  }
}

export function completenessSummary(r: CompletenessReport | undefined): string {
  if (!r) return 'completeness NOT CHECKED: no state.db in the coordinator directory, so nothing says which entries must be there';
  if (r.ok) return `completeness OK: each of the ${r.updates} accepted update(s) in the store has exactly one entry`;
  return [`completeness BROKEN: ${r.problems.length} problem(s)${r.pending ? `, ${r.pending} entr${r.pending === 1 ? 'y' : 'ies'} still waiting in the outbox` : ''}`, ...r.problems.map((p) => `  ${p}`)].join('\n');
}

/** Fetches the ledger over the Governance service, as this site. */
export async function fetchLedgerLines(home: SiteHome): Promise<string[]> {
  const connection = new SiteConnection(home);
  const client = connection.governance();
  try {
    return await new Promise<string[]>((resolve, reject) => {
      const lines: string[] = [];
      const stream = client.FetchLedger({ fromSeq: 1 }, { deadline: Date.now() + 60_000 }) as grpc.ClientReadableStream<{ json: string }>;
      stream.on('data', (m: { json: string }) => lines.push(m.json));
      stream.on('error', (e: grpc.ServiceError) => reject(new Error(`cannot fetch the ledger from the coordinator: ${e.details ?? e.message}`)));
      stream.on('end', () => resolve(lines));
    });
  } finally {
    connection.close();
  }
}

export async function siteLedger(o: { dir: string; lines?: string[] }): Promise<{ ok: boolean; text: string; own: LedgerEntry[] }> {
  const home = new SiteHome(o.dir);
  const c = home.config();
  const lines = o.lines ?? (await fetchLedgerLines(home));
  const headPath = join(o.dir, LEDGER_HEAD_FILE);
  const expectHead = existsSync(headPath) ? HeadSchema.parse(JSON.parse(readFileSync(headPath, 'utf8'))) : undefined;
  const report = verifyChain(lines, { coordinatorPublicKey: Buffer.from(c.coordinatorPublicKey, 'base64'), federation: c.federationId, expectHead });
  const own = report.entries.filter((e) => e.site === c.siteName);
  const out = [`${report.entries.length} ledger entr${report.entries.length === 1 ? 'y' : 'ies'} from the coordinator; ${own.length} for site '${c.siteName}':`, ledgerTable(own, report)];
  // Rounds this site agreed to train in (site policy record) with no entry: refused, late, or missing.
  const spentPath = join(o.dir, PRIVACY_SPENT_FILE);
  if (existsSync(spentPath)) {
    const rounds = (JSON.parse(readFileSync(spentPath, 'utf8')) as { rounds?: number[] }).rounds ?? [];
    const missing = rounds.filter((r) => !own.some((e) => e.round === r));
    if (missing.length > 0) out.push(`rounds this site trained in with no ledger entry (update refused, too late, or not recorded): ${missing.join(', ')}`);
  }
  out.push(summary(report));
  if (report.ok) writeFileAtomic(headPath, JSON.stringify(report.head) + '\n');
  return { ok: report.ok, text: out.join('\n'), own };
}

/** `medfl site privacy`: the site's policy and what it has spent so far in its federation. */
export function sitePrivacy(o: { dir: string }): string {
  const home = new SiteHome(o.dir);
  const c = home.config();
  const policy = SitePolicy.load(o.dir, c.federationId);
  const dp = policy.config?.dp;
  const eps = policy.spentEpsilon();
  return [
    `site '${c.siteName}', federation ${c.federationId}`,
    `policy: ${policy.source ?? 'none (every plan accepted)'}${policy.config ? `\n  ${JSON.stringify(policy.config)}` : ''}`,
    `rounds accepted: ${policy.roundsAccepted}${policy.config?.maxRounds !== undefined ? ` of at most ${policy.config.maxRounds}` : ''}`,
    `ε spent: ${Number.isFinite(eps) ? eps.toFixed(3) : '∞ (a round without DP was accepted)'} at δ = ${dp?.delta ?? 1e-5}${dp?.maxEpsilon !== undefined ? `, cap ${dp.maxEpsilon}` : ''} (assuming the coordinator applies the DP its signed tasks announce)`,
  ].join('\n');
}

export function registerAuditCommands(program: Command): void {
  program
    .command('audit')
    .description('check the contribution ledger')
    .command('verify')
    .description("re-check a coordinator's contribution ledger: hash chain, sequence, coordinator signatures, and one entry per accepted update in its store")
    .requiredOption('--dir <dir>', 'coordinator directory')
    .option('--nats <url>', 'read the ledger from the JetStream stream on this NATS server instead of the local file')
    .option('--expect-head <seq:hash>', 'a head printed by an earlier verify: fails if the ledger no longer contains it (entries cut off or rewritten)')
    .action(async (o: { dir: string; nats?: string; expectHead?: string }) => {
      const r = await auditVerify(o);
      process.stdout.write(r.text + '\n');
      process.exitCode = r.ok ? 0 : 1;
    });
  const site = program.commands.find((c) => c.name() === 'site');
  if (!site) throw new Error('internal: the `site` command must be registered before the audit commands');
  site
    .command('ledger')
    .description("fetch the coordinator's contribution ledger, verify it, and list this site's entries")
    .requiredOption('--dir <dir>', 'site directory')
    .action(async (o: { dir: string }) => {
      const r = await siteLedger(o);
      process.stdout.write(r.text + '\n');
      process.exitCode = r.ok ? 0 : 1;
    });
  site
    .command('privacy')
    .description("this site's policy (policy.yaml) and the privacy it has spent so far (its own RDP accountant)")
    .requiredOption('--dir <dir>', 'site directory')
    .action((o: { dir: string }) => {
      process.stdout.write(sitePrivacy(o) + '\n');
    });
}
