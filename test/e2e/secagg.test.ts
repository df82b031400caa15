/**
 * Secure aggregation in real federation rounds: a coordinator and three site-agent processes over TLS +
 * tokens, plan aggregation.secureAggregation with t = 2. Round 1 runs with all three sites; in round 2
 * site-c exits right after its masked input was taken (its agent's observer exits at the 'masked-sent' step:
 * helpers/site-exits-after-masking.ts), so the coordinator must rebuild
 * its self mask from the other two sites' shares. Checks that:
 *  - no plain update ever reached the coordinator (no UploadUpdate call, no update rows);
 *  - the masked vectors the coordinator stored are unrelated to the sites' actual contributions, which each
 *    site kept on its own disk;
 *  - each new global model is base + Σ wᵢΔᵢ / Σ wᵢ of those contributions (plain weighted FedAvg) up to the
 *    fixed-point quantisation.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { makeFederation, TEST_PLAN, exited, type TestFederation } from '../helpers/federation.ts';
import { decodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { encodeRoundVector, type RoundSecAgg } from '../../shared/privacy/secagg/wire.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { sharedParams } from '../../shared/model/sharing.ts';
import { parsePlan } from '../../shared/plan/load.ts';
import type { AuditedCall } from '../../site-agent/transport/wire-audit.ts';

const plan = TEST_PLAN({ rounds: 2, minSites: 2, deadline: 120 }) + 'aggregation: { secureAggregation: { enabled: true, threshold: 2, clip: 1, phaseSeconds: 4 } }\n';

describe('secure aggregation in federation rounds (separate processes)', () => {
  let fed: TestFederation;
  let codes: (number | null)[];
  const names = () => sharedParams(architectureFor(parsePlan(plan).model), parsePlan(plan).share).map((p) => p.name);

  beforeAll(async () => {
    fed = await makeFederation({ sites: 3, plan });
    await fed.startCoordinator();
    await fed.enrollAll();
    const agents = fed.sites.map((s) => {
      const audit = join(fed.work, 'logs', `${s}.wire.jsonl`);
      // site-c leaves for good right after its round-2 masked input was taken.
      return s === 'site-c' ? fed.startSiteScript(s, fileURLToPath(new URL('../helpers/site-exits-after-masking.ts', import.meta.url)), [audit, '2']) : fed.startSite(s, ['--audit-wire', audit]);
    });
    codes = await Promise.all(agents.map((a) => exited(a, 200_000)));
  }, 240_000);

  afterAll(() => fed?.killAll());

  it('closes both rounds, the second with site-c gone after masking; site-c exited by the fault, the others at the end', () => {
    expect(codes).toEqual([0, 0, 3]);
    const rounds = fed.store().listRounds();
    expect(rounds.map((r) => [r.round, r.state])).toEqual([
      [1, 'closed'],
      [2, 'closed'],
    ]);
    const log = readFileSync(fed.logPath('coordinator'), 'utf8');
    const unmasked = log.split('\n').filter((l) => l.includes('secure aggregation: sum unmasked')).map((l) => JSON.parse(l) as { round: number; survivors: string[]; missingUnmask: string[] });
    expect(unmasked.map((u) => [u.round, u.survivors, u.missingUnmask])).toEqual([
      [1, fed.sites, []],
      [2, fed.sites, ['site-c']],
    ]);
  });

  it('no plain update reached the coordinator: no UploadUpdate call, no update rows; the sites sent only SecAgg messages', () => {
    for (const r of [1, 2]) expect(fed.store().updatesForRound(r)).toEqual([]);
    for (const s of fed.sites) {
      const calls = readFileSync(join(fed.work, 'logs', `${s}.wire.jsonl`), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as AuditedCall);
      const methods = new Set(calls.map((c) => c.method));
      expect(methods.has('/medfl.v1.Federation/UploadUpdate')).toBe(false);
      expect(methods.has('/medfl.v1.SecureAggregation/MaskedInput')).toBe(true);
    }
  });

  it("a stored masked input is statistically unrelated to the site's actual contribution", () => {
    const L = names().length && readFileSync(join(fed.siteDir('site-a'), 'secagg', 'round-1.f32')).length / 4;
    for (const s of fed.sites) {
      const rec = JSON.parse(readFileSync(join(fed.siteDir(s), 'secagg', 'round-1.json'), 'utf8')) as { id: number; weight: number };
      const f32 = readFileSync(join(fed.siteDir(s), 'secagg', 'round-1.f32'));
      const delta = new Float32Array(f32.buffer, f32.byteOffset, L);
      const sa: RoundSecAgg = { id: rec.id, threshold: 2, clip: 1, maxWeight: 10_000, sites: 3, vectorLength: L + 1 };
      const plain = new Int32Array(encodeRoundVector(delta, rec.weight, sa).buffer);
      const mb = readFileSync(join(fed.coordDir, 'updates', 'secagg', 'round-1', `masked-${s}.u32`));
      expect(mb.length).toBe(4 * (L + 1));
      const masked = new Int32Array(mb.buffer.slice(mb.byteOffset, mb.byteOffset + mb.length));
      let same = 0;
      let mx = 0, my = 0;
      for (let i = 0; i < L; i++) {
        if (masked[i] === plain[i]) same++;
        mx += masked[i]! / L;
        my += plain[i]! / L;
      }
      let sxy = 0, sxx = 0, syy = 0;
      for (let i = 0; i < L; i++) {
        const a = masked[i]! - mx, b = plain[i]! - my;
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
      }
      const r = sxy / Math.sqrt(sxx * syy);
      // Independent vectors of L ≈ thousands: |r| ~ 1/√L. The plain vector itself is far from constant.
      expect(syy).toBeGreaterThan(0);
      expect(Math.abs(r)).toBeLessThan(5 / Math.sqrt(L));
      expect(same).toBeLessThan(Math.max(3, L / 1000));
      // The masked words spread over the whole ring (|plain| ≤ a few % of it).
      expect(Math.abs(mx) / 2 ** 31).toBeLessThan(0.1);
      expect(sxx / L).toBeGreaterThan(0.5 * (2 ** 64 / 12));
    }
  });

  it('each new global model is plain weighted FedAvg of the sites’ contributions, up to quantisation', () => {
    const store = fed.store();
    const shared = names();
    for (const round of [1, 2]) {
      const row = store.listRounds().find((r) => r.round === round)!;
      const base = decodeSafetensors(readFileSync(store.getModel(row.baseModelHash)!.path)).bundle;
      const next = decodeSafetensors(readFileSync(store.getModel(row.resultModelHash!)!.path)).bundle;
      const contributions = fed.sites.map((s) => {
        const rec = JSON.parse(readFileSync(join(fed.siteDir(s), 'secagg', `round-${round}.json`), 'utf8')) as { weight: number };
        const b = readFileSync(join(fed.siteDir(s), 'secagg', `round-${round}.f32`));
        return { weight: rec.weight, delta: new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length)) };
      });
      expect(contributions.every((c) => c.weight >= 2)).toBe(true);
      const W = contributions.reduce((a, c) => a + c.weight, 0);
      let off = 0;
      let maxErr = 0;
      let maxStep = 0;
      for (const name of shared) {
        const b = base.get(name)!.data;
        const y = next.get(name)!.data;
        for (let i = 0; i < b.length; i++) {
          let s = 0;
          for (const c of contributions) s += c.weight * c.delta[off + i]!;
          const expected = b[i]! + s / W;
          maxErr = Math.max(maxErr, Math.abs(y[i]! - expected));
          maxStep = Math.max(maxStep, Math.abs(s / W));
        }
        off += b.length;
      }
      expect(off).toBe(contributions[0]!.delta.length);
      // Quantisation: 3 sites × 0.5/scale × maxWeight / Σw ≈ 1e-5, plus float32 rounding of the weights.
      expect(maxErr).toBeLessThan(5e-5);
      expect(maxStep).toBeGreaterThan(1e-3);
    }
  });

  it('the coordinator never wrote a plain update file', () => {
    expect(existsSync(join(fed.coordDir, 'updates', 'round-1'))).toBe(false);
  });
});
