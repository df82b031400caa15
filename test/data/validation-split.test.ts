/**
 * The honest-evaluation data rules: a site without validation cases holds back a fixed share of its labelled
 * cases (the same ones every time, and the pooled arm leaves exactly those out of training), and a test folder
 * may hold only imagesTs/ + labelsTs/.
 */
import { describe, expect, it } from 'vitest';
import { cpSync, mkdirSync, mkdtempSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { SiteData, validationCarve } from '../../site-agent/data/site-data.ts';
import { poolFolders } from '../../cli/experiment.ts';
import { loadTestCases, medianSpacing, siteMeta } from '../../cli/experiment/data.ts';

describe('validation split and test folders', () => {
  it('carves about one in six labelled cases as validation when a site has none, the same ones every time', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-carve-'));
    await writePhantomSite(dir, { siteName: 'carve', cases: 12, valCases: 0, size: [16, 16, 16], seed: 3, intensityShift: 0, intensityScale: 1 });
    const plain = await SiteData.open(dir, { patch: [16, 16, 16] });
    expect([plain.train.length, plain.val.length, plain.carved]).toEqual([12, 0, 0]);
    const a = await SiteData.open(dir, { patch: [16, 16, 16], carveValidation: true });
    const b = await SiteData.open(dir, { patch: [16, 16, 16], carveValidation: true });
    expect([a.train.length, a.val.length, a.carved]).toEqual([10, 2, 2]);
    // The same cases both times: compare the voxels of the validation cases.
    for (let i = 0; i < 2; i++) expect((await a.load(a.val[i]))!.channels[0]).toEqual((await b.load(b.val[i]))!.channels[0]);
    expect(validationCarve(['a', 'b', 'c', 'd'])).toEqual(new Set());
    expect(validationCarve(['a', 'b', 'c', 'd', 'e']).size).toBe(1);
    expect(validationCarve(Array.from({ length: 15 }, (_, i) => `c${i}`)).size).toBe(3);

    // The pooled arm trains on the other ten and validates on the two.
    const pooled = poolFolders(join(mkdtempSync(join(tmpdir(), 'medfl-carve-pool-')), 'pooled'), [dir]);
    expect(readdirSync(join(pooled, 'labelsTr'))).toHaveLength(10);
    expect(readdirSync(join(pooled, 'labelsTs'))).toHaveLength(2);
    const p = await SiteData.open(pooled, { patch: [16, 16, 16], carveValidation: true });
    expect([p.train.length, p.val.length, p.carved]).toEqual([10, 2, 0]);
  }, 60_000);

  it('keeps a site\'s own validation cases and carves nothing', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'medfl-owncarve-'));
    await writePhantomSite(dir, { siteName: 'own', cases: 8, valCases: 2, size: [16, 16, 16], seed: 4, intensityShift: 0, intensityScale: 1 });
    const d = await SiteData.open(dir, { patch: [16, 16, 16], carveValidation: true });
    expect([d.train.length, d.val.length, d.carved]).toEqual([8, 2, 0]);
  }, 60_000);

  it('reads a test folder of only imagesTs/ + labelsTs/ with the sites\' labels, and says what is missing otherwise', async () => {
    const site = mkdtempSync(join(tmpdir(), 'medfl-testsite-'));
    await writePhantomSite(site, { siteName: 'ts', cases: 2, valCases: 2, size: [16, 16, 16], seed: 5, intensityShift: 0, intensityScale: 1 });
    const test = mkdtempSync(join(tmpdir(), 'medfl-testonly-'));
    for (const sub of ['imagesTs', 'labelsTs']) cpSync(join(site, sub), join(test, sub), { recursive: true });
    const r = await loadTestCases(test, siteMeta(site), [16, 16, 16]);
    expect(r.cases).toHaveLength(2);
    expect(r.numClasses).toBe(2);
    await expect(SiteData.open(test, { patch: [16, 16, 16] })).rejects.toThrow(/dataset\.json/);
    const empty = mkdtempSync(join(tmpdir(), 'medfl-testempty-'));
    mkdirSync(join(empty, 'labelsTs'));
    await expect(loadTestCases(empty, siteMeta(site), [16, 16, 16])).rejects.toThrow(/imagesTs/);
  }, 60_000);

  it('proposes the median voxel spacing of the sites, and says whether their grids differ', async () => {
    const dirs = [1.5, 1.5, 2.5].map((_mm, i) => join(mkdtempSync(join(tmpdir(), 'medfl-spacing-')), `s${i}`));
    for (const [i, mm] of [1.5, 1.5, 2.5].entries()) await writePhantomSite(dirs[i], { siteName: `sp${i}`, cases: 2, valCases: 0, size: [16, 16, 16], seed: 6 + i, intensityShift: 0, intensityScale: 1, spacing: [mm, mm, mm] });
    expect(await medianSpacing(dirs)).toEqual({ spacing: [1.5, 1.5, 1.5], differ: true });
    expect(await medianSpacing(dirs.slice(0, 2))).toEqual({ spacing: [1.5, 1.5, 1.5], differ: false });
  }, 60_000);
});
