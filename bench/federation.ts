/**
 * `npm run bench:federation`: a REAL federation of a plan on given site folders — one coordinator and one
 * `medfl site run` process per site on loopback, TLS and tokens on — then each site scores the final global
 * model with its own head on a common test folder (`medfl site evaluate`'s code). Prints test Dice per site,
 * the mean, and the wall time, and writes federation-results.json, so a simulated `medfl experiment` arm can
 * be checked against the real thing.
 *
 *   npm run bench:federation -- --sites A,B,C --test T [--plan plan.yaml] [--seed 1] [--out DIR]
 * Without --plan: `medfl experiment`'s recommended Med3D plan.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import { stringify } from 'yaml';
import { CoordinatorHome } from '../coordinator/home.ts';
import { addSite } from '../coordinator/admin.ts';
import { CoordinatorStore } from '../coordinator/store/store.ts';
import { freePort, runToEnd, spawnMedfl, waitFor } from '../cli/processes.ts';
import { recommendedPlan } from '../cli/experiment.ts';
import { siteMeta } from '../cli/experiment/data.ts';
import { runSiteEvaluate } from '../cli/site-evaluate.ts';
import { loadPlanFile } from '../shared/plan/load.ts';
import { PlanSchema } from '../shared/plan/schema.ts';
import { generatedSiteName } from '../shared/protocol/site-names.ts';

const { values: a } = parseArgs({
  options: { sites: { type: 'string' }, test: { type: 'string' }, plan: { type: 'string' }, seed: { type: 'string', default: '1' }, out: { type: 'string' } },
});
if (!a.sites || !a.test) throw new Error('give --sites A,B,C and --test T');
const siteDirs = a.sites.split(',').map((d) => resolve(d.trim()));
const testDir = resolve(a.test);
const seed = Number(a.seed);
const base = a.plan ? loadPlanFile(a.plan) : recommendedPlan('med3d', Math.max(2, Object.keys(siteMeta(siteDirs[0]).labels).length));
// Every site in every round (as the simulation), generous deadlines: a 2-core machine runs all sites at once.
const plan = PlanSchema.parse({ ...base, model: { ...base.model, seed }, minSites: siteDirs.length, gatherSeconds: 30, roundDeadlineSeconds: 3600, waitForSitesSeconds: 600 });

const work = a.out ? resolve(a.out) : mkdtempSync(join(tmpdir(), 'medfl-federation-'));
mkdirSync(work, { recursive: true });
const logs = join(work, 'logs');
mkdirSync(logs, { recursive: true });
const say = (s: string) => process.stdout.write(s + '\n');
const coordDir = join(work, 'coordinator');
if (existsSync(join(coordDir, 'coordinator.json'))) throw new Error(`${coordDir} already holds a coordinator; give a fresh --out`);
const port = await freePort();
const home = await CoordinatorHome.init(coordDir, { hosts: ['localhost', '127.0.0.1'], port });
writeFileSync(home.planPath, stringify(JSON.parse(JSON.stringify(plan))));
const names = siteDirs.map((_, i) => generatedSiteName(i));
const invitations = names.map((n) => addSite(coordDir, n, { ttlSeconds: 3600 }));
say(`real federation: 1 coordinator + ${names.length} site processes, TLS + tokens, ${plan.rounds} rounds × ${plan.local.steps ?? '?'} steps, seed ${seed}; work dir ${work}`);

const started = Date.now();
const coordinator = spawnMedfl(['coordinator', 'start', '--dir', coordDir, '--port', String(port), '--bind', '127.0.0.1'], join(logs, 'coordinator.log'));
const children = [coordinator];
try {
  await waitFor(() => existsSync(join(logs, 'coordinator.log')) && readFileSync(join(logs, 'coordinator.log'), 'utf8').includes('listening on port'), 60_000, 'the coordinator to listen');
  await Promise.all(invitations.map((inv, i) => runToEnd(['site', 'enroll', '--coordinator', `localhost:${port}`, '--token', inv.token, '--ca-fingerprint', inv.caFingerprint, '--dir', join(work, 'sites', names[i])], join(logs, `${names[i]}.log`))));
  if (plan.share.parts.includes('head')) {
    // The plan shares the head: each hospital must say so in its own policy, as a real site admin would.
    for (const n of names) writeFileSync(join(work, 'sites', n, 'policy.yaml'), `share:\n  parts: [${plan.share.parts.join(', ')}]\n`);
    say(`  every site's policy.yaml allows sharing ${plan.share.parts.join(' + ')} (the plan shares the head)`);
  }
  const agents = names.map((n, i) => spawnMedfl(['site', 'run', '--dir', join(work, 'sites', n), '--data', siteDirs[i], '--exit-when-finished', '--audit-wire', join(logs, `${n}.wire.jsonl`)], join(logs, `${n}.log`)));
  children.push(...agents);
  const store = new CoordinatorStore(home.dbPath);
  let last = 0;
  await waitFor(() => {
    const closed = store.closedRoundCount();
    if (closed > last) say(`  round ${closed} closed (${Math.round((Date.now() - started) / 1000)} s)`);
    last = closed;
    if (coordinator.exitCode !== null) throw new Error(`the coordinator exited (code ${coordinator.exitCode}); see ${logs}`);
    const dead = agents.filter((x) => x.exitCode !== null && x.exitCode !== 0);
    if (dead.length > 0) throw new Error(`a site agent died; see ${logs}`);
    return closed >= plan.rounds;
  }, 4 * 3600_000, `${plan.rounds} rounds`, 500);
  const trainSeconds = (Date.now() - started) / 1000;
  await waitFor(() => agents.every((x) => x.exitCode !== null), 60_000, 'site agents to finish').catch(() => undefined);
  const model = join(coordDir, 'models', `${store.getMeta('current_model')!}.safetensors`);
  store.close();
  const planPath = home.planPath;
  const dice: Record<string, number> = {};
  for (const [i, n] of names.entries()) {
    const r = await runSiteEvaluate({ dir: join(work, 'sites', n), data: siteDirs[i], test: testDir, model, plan: loadPlanFile(planPath), log: pino({ level: 'warn' }) });
    dice[n] = r.meanDice;
    say(`  ${n}: test Dice ${r.meanDice.toFixed(3)} on ${r.cases} cases`);
  }
  const mean = Object.values(dice).reduce((x, y) => x + y, 0) / names.length;
  const seconds = (Date.now() - started) / 1000;
  say(`mean test Dice over sites (final global model + each site's own head): ${mean.toFixed(3)}; federation ${trainSeconds.toFixed(0)} s, total ${seconds.toFixed(0)} s`);
  writeFileSync(join(work, 'federation-results.json'), JSON.stringify({ seed, plan, dice, meanDice: mean, trainSeconds, seconds, model }, null, 2) + '\n');
} finally {
  for (const c of children) if (c.exitCode === null) c.kill('SIGTERM');
}
process.exit(0);
