/**
 * `medfl site import-dicom` on DICOM series generated here (test/helpers/dicom-writer.ts): voxels with the rescale
 * applied, spacing from the slice positions, the affine from orientation and position (LPS → RAS), the canonical
 * orientation MedFL trains in, labels by series, no identifiers in names, and clear refusals.
 */
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runCheckData } from '../../cli/check-data.ts';
import { formatImportReport, runImportDicom } from '../../cli/import-dicom.ts';
import { readNifti, writeNifti } from '../../site-agent/data/nifti.ts';
import { toCanonical } from '../../site-agent/data/orientation.ts';
import { JPEG_BASELINE, writeDicomSeg, writeDicomSlice, type SegFrameSpec, type SliceSpec } from '../helpers/dicom-writer.ts';

const tmp = mkdtempSync(join(tmpdir(), 'medfl-dicom-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const [COLS, ROWS, SLICES] = [10, 9, 7];
const PS: [number, number] = [0.8, 0.7]; // row spacing, column spacing
const DZ = 2.5;

/** Rotation about axis u by angle a (columns are the rotated basis). */
function rotation(u: [number, number, number], a: number): number[][] {
  const n = Math.hypot(...u);
  const [x, y, z] = u.map((v) => v / n);
  const [c, s, t] = [Math.cos(a), Math.sin(a), 1 - Math.cos(a)];
  return [
    [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
    [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
    [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
  ];
}

/** The true value of voxel (column i, row j, slice k) in HU-like units (even: slope 2 stores it exactly in 12 bits). */
const truth = (i: number, j: number, k: number) => -1000 + 2 * (37 * i + 101 * j + 301 * k + ((i * j * k) % 5));

interface Series {
  readonly uid: string;
  readonly r: number[];
  readonly c: number[];
  readonly n: number[];
  readonly p0: number[];
}

/** Writes a series in shuffled file order with shuffled InstanceNumbers; stored = (value − intercept) / slope. */
function writeSeries(dir: string, s: Series, o: { skip?: number; jitter?: (k: number) => number; tilt?: number; patient?: string; transferSyntax?: string; slope?: number; intercept?: number; signed?: boolean } = {}): void {
  const slope = o.slope ?? 2;
  const intercept = o.intercept ?? -1024;
  const order = [3, 0, 6, 1, 5, 2, 4];
  for (const k of order) {
    if (k === o.skip) continue;
    const stored = o.signed ? new Int16Array(ROWS * COLS) : new Uint16Array(ROWS * COLS);
    for (let j = 0; j < ROWS; j++) for (let i = 0; i < COLS; i++) stored[j * COLS + i] = (truth(i, j, k) - intercept) / slope;
    const z = k * DZ + (o.jitter?.(k) ?? 0);
    const position = [0, 1, 2].map((a) => s.p0[a] + z * s.n[a] + (o.tilt ?? 0) * k * s.c[a]);
    const spec: SliceSpec = {
      seriesUid: s.uid,
      sopInstanceUid: `${s.uid}.${k + 1}`,
      rows: ROWS,
      columns: COLS,
      pixelSpacing: PS,
      orientation: [...s.r, ...s.c],
      position,
      stored,
      signed: o.signed ?? false,
      bitsStored: o.signed ? 16 : 12,
      slope,
      intercept,
      instanceNumber: 7 - k,
      patientName: o.patient ?? 'DOE^JANE',
      ...(o.transferSyntax ? { transferSyntax: o.transferSyntax } : {}),
    };
    writeDicomSlice(join(dir, `IMG${String(order.indexOf(k)).padStart(4, '0')}`), spec);
  }
}

const R = rotation([0.3, -0.5, 0.8], 0.6);
const oblique: Series = { uid: '1.2.826.0.1.3680043.10.999.7.1', r: R.map((row) => row[0]), c: R.map((row) => row[1]), n: R.map((row) => row[2]), p0: [-100.5, 50.25, 30] };
const axial: Series = { uid: '1.2.826.0.1.3680043.10.999.7.2', r: [1, 0, 0], c: [0, 1, 0], n: [0, 0, 1], p0: [-20, -30, 40] };

describe('DICOM import', () => {
  it('converts an oblique and an axial series: voxels (rescaled), spacing from positions, the affine in RAS', async () => {
    const src = join(tmp, 'src1');
    writeSeries(join(src, 'study', 'a'), oblique);
    writeSeries(join(src, 'study', 'b'), axial);
    writeFileSync(join(src, 'study', 'README.txt'), 'not dicom');
    const out = join(tmp, 'out1');
    const map = join(tmp, 'map1.csv');
    const r = await runImportDicom({ input: src, out, map });
    expect(r.cases).toHaveLength(2);
    expect(r.skippedSeries).toEqual([]);
    expect(r.skippedFiles).toEqual([{ reason: 'not a DICOM Part 10 file (no "DICM" after the 128-byte preamble)', files: 1 }]);
    const mapRows = readFileSync(map, 'utf8').trim().split('\n');
    expect(statSync(map).mode & 0o777).toBe(0o600);
    const caseOf = (uid: string) => mapRows.find((l) => l.includes(uid))!.split(',')[0];

    for (const s of [oblique, axial]) {
      const v = await readNifti(join(out, 'imagesTr', `${caseOf(s.uid)}_0000.nii.gz`));
      expect(v.dims).toEqual([COLS, ROWS, SLICES]);
      expect(v.datatype).toBe('int16');
      for (let a = 0; a < 3; a++) expect(v.spacing[a]).toBeCloseTo([PS[1], PS[0], DZ][a], 4);
      // Voxel (i, j, k) is column i, row j of the k-th slice along the normal, with the rescale applied.
      for (let k = 0; k < SLICES; k++) for (let j = 0; j < ROWS; j++) for (let i = 0; i < COLS; i++) expect(v.data[i + COLS * (j + ROWS * k)]).toBe(truth(i, j, k));
      // World position of voxel (i, j, k): p0 + i·colSpacing·r + j·rowSpacing·c + k·dz·n in LPS, then x, y negated.
      const flip = [-1, -1, 1];
      for (const [i, j, k] of [[0, 0, 0], [9, 0, 0], [0, 8, 0], [3, 4, 6], [9, 8, 6]]) {
        const world = [0, 1, 2].map((a) => v.affine[a][0] * i + v.affine[a][1] * j + v.affine[a][2] * k + v.affine[a][3]);
        const want = [0, 1, 2].map((a) => flip[a] * (s.p0[a] + i * PS[1] * s.r[a] + j * PS[0] * s.c[a] + k * DZ * s.n[a]));
        for (let a = 0; a < 3; a++) expect(world[a]).toBeCloseTo(want[a], 3);
      }
    }
    // The axial LPS series in MedFL's canonical RAS+: x (columns) and y (rows) reversed, slices kept.
    const ax = toCanonical(await readNifti(join(out, 'imagesTr', `${caseOf(axial.uid)}_0000.nii.gz`)));
    expect(ax.dims).toEqual([COLS, ROWS, SLICES]);
    for (const [i, j, k] of [[0, 0, 0], [2, 5, 3], [9, 8, 6]]) expect(ax.data[i + COLS * (j + ROWS * k)]).toBe(truth(COLS - 1 - i, ROWS - 1 - j, k));
    // The same voxels written straight to NIfTI with the expected affine come out of MedFL's reader identically.
    const direct = join(tmp, 'direct.nii.gz');
    const vol = Int16Array.from({ length: COLS * ROWS * SLICES }, (_, q) => truth(q % COLS, Math.floor(q / COLS) % ROWS, Math.floor(q / (COLS * ROWS))));
    const affine = [[-PS[1], 0, 0, 20], [0, -PS[0], 0, 30], [0, 0, DZ, 40], [0, 0, 0, 1]];
    await writeNifti(direct, { data: vol, dims: [COLS, ROWS, SLICES], spacing: [PS[1], PS[0], DZ], affine });
    const viaNifti = toCanonical(await readNifti(direct));
    expect([...viaNifti.data]).toEqual([...ax.data]);
    expect(viaNifti.spacing).toEqual(ax.spacing);

    // No identifier in names or dataset.json; the folder passes check-data.
    const names = readdirSync(out, { recursive: true }).map(String);
    expect(names.sort()).toEqual(['dataset.json', 'imagesTr', 'imagesTr/case_000_0000.nii.gz', 'imagesTr/case_001_0000.nii.gz']);
    const json = readFileSync(join(out, 'dataset.json'), 'utf8');
    expect(json).not.toMatch(/1\.2\.826|DOE|JANE|study/);
    expect(JSON.parse(json).modality).toEqual({ '0': 'CT' });
    const report = formatImportReport(r);
    expect(report).not.toMatch(/1\.2\.826|DOE|study\/a/);
    let text = '';
    expect(await runCheckData(out, (t) => void (text += t))).toBe(0);
    expect(text).toMatch(/usable: 0 training, 0 validation, 2 unlabelled/);
  });

  it('refuses missing slices, uneven spacing, gantry tilt, compressed pixel data, each with its reason; imports the rest', async () => {
    const src = join(tmp, 'src2');
    const uid = (n: number) => `1.2.826.0.1.3680043.10.999.8.${n}`;
    writeSeries(join(src, 'missing'), { ...axial, uid: uid(1) }, { skip: 3 });
    writeSeries(join(src, 'uneven'), { ...axial, uid: uid(2) }, { jitter: (k) => (k === 2 ? 0.6 : 0) });
    writeSeries(join(src, 'tilt'), { ...axial, uid: uid(3) }, { tilt: 0.4 });
    writeSeries(join(src, 'jpeg'), { ...axial, uid: uid(4) }, { transferSyntax: JPEG_BASELINE });
    writeSeries(join(src, 'good'), { ...axial, uid: uid(5) }, { signed: true, slope: 0.5, intercept: 0.25 });
    const out = join(tmp, 'out2');
    const r = await runImportDicom({ input: src, out });
    expect(r.cases).toHaveLength(1);
    const reasons = r.skippedSeries.map((s) => s.reason).sort();
    expect(reasons).toHaveLength(3);
    expect(reasons[0]).toMatch(/^1 slice\(s\) missing: steps of 5 mm where the series steps 2\.5 mm$/);
    expect(reasons[1]).toMatch(/^slices are not stacked along their normal .*gantry tilt/);
    expect(reasons[2]).toMatch(/^uneven slice spacing: steps from 1\.9 to 3\.1 mm/);
    expect(r.skippedFiles).toEqual([{ reason: expect.stringMatching(/^compressed transfer syntax JPEG Baseline \(1\.2\.840\.10008\.1\.2\.4\.50\).*gdcmconv --raw/), files: 7 }]);
    // Signed storage with a fractional rescale: float32 voxels, exactly stored·0.5 + 0.25.
    const v = await readNifti(join(out, 'imagesTr', 'case_000_0000.nii.gz'));
    expect(v.datatype).toBe('float32');
    for (const [i, j, k] of [[0, 0, 0], [4, 4, 4], [9, 8, 6]]) {
      const stored = Math.trunc((truth(i, j, k) - 0.25) / 0.5);
      expect(v.data[i + COLS * (j + ROWS * k)]).toBe(stored * 0.5 + 0.25);
    }
  });

  it('takes labels named by SeriesInstanceUID onto their case and refuses one on another grid', async () => {
    const src = join(tmp, 'src3');
    const s1 = { ...axial, uid: '1.2.826.0.1.3680043.10.999.9.1' };
    const s2 = { ...oblique, uid: '1.2.826.0.1.3680043.10.999.9.2' };
    writeSeries(join(src, 'x'), s1);
    writeSeries(join(src, 'y'), s2);
    const labels = join(tmp, 'labels3');
    const lab = Uint8Array.from({ length: COLS * ROWS * SLICES }, (_, q) => (q % 7 === 0 ? 1 : 0));
    await writeNifti(join(labels, `${s1.uid}.nii.gz`), { data: lab, dims: [COLS, ROWS, SLICES], spacing: [PS[1], PS[0], DZ], affine: [[-PS[1], 0, 0, 20], [0, -PS[0], 0, 30], [0, 0, DZ, 40], [0, 0, 0, 1]] });
    await writeNifti(join(labels, `${s2.uid}.nii.gz`), { data: lab, dims: [COLS, ROWS, SLICES], spacing: [PS[1], PS[0], DZ] });
    const out = join(tmp, 'out3');
    const r = await runImportDicom({ input: src, out, labels });
    expect(r.cases.filter((c) => c.labelled)).toHaveLength(1);
    expect(r.labels.problems).toEqual([expect.stringMatching(/^case_00\d: its label is on another grid/)]);
    const labelled = r.cases.find((c) => c.labelled)!.case;
    expect(readdirSync(join(out, 'labelsTr'))).toEqual([`${labelled}.nii.gz`]);
    let text = '';
    expect(await runCheckData(out, (t) => void (text += t))).toBe(0);
    expect(text).toMatch(/usable: 1 training, 0 validation, 1 unlabelled/);
  });

  it('refuses an output folder that is not empty, or one inside the input', async () => {
    const src = join(tmp, 'src1');
    await expect(runImportDicom({ input: src, out: join(tmp, 'out1') })).rejects.toThrow(/exists and is not empty/);
    await expect(runImportDicom({ input: src, out: join(src, 'nested') })).rejects.toThrow(/must not be inside --in/);
  });

  describe('DICOM-SEG labels', () => {
    /** The expected label of voxel (column i, row j, slice k): segment 2 a box, segment 1 a lattice around it. */
    const mask = (i: number, j: number, k: number): number => (i >= 2 && i <= 4 && j >= 3 && j <= 5 && k >= 1 && k <= 3 ? 2 : (i + 2 * j + k) % 5 === 0 ? 1 : 0);
    const segments = [
      { number: 1, label: 'liver' },
      { number: 2, label: 'tumour' },
    ];
    /** One frame per (segment, slice) that holds any of it, in a shuffled order; `value` gives a pixel's stored value. */
    function framesOf(s: Series, how: 'sop' | 'position', value: (inside: boolean, q: number) => number): SegFrameSpec[] {
      const frames: SegFrameSpec[] = [];
      for (const k of [5, 0, 3, 6, 1, 4, 2]) {
        for (const segment of [2, 1]) {
          const pixels = new Uint8Array(ROWS * COLS);
          for (let j = 0; j < ROWS; j++) for (let i = 0; i < COLS; i++) pixels[j * COLS + i] = value(mask(i, j, k) === segment, j * COLS + i);
          if (!pixels.some((v) => v > 0)) continue;
          const position = [0, 1, 2].map((a) => s.p0[a] + k * DZ * s.n[a]);
          frames.push({ segment, pixels, ...(how === 'sop' ? { sopInstanceUid: `${s.uid}.${k + 1}` } : { position }) });
        }
      }
      return frames;
    }
    const segOf = (s: Series, segUid: string, frames: SegFrameSpec[], extra: Partial<Parameters<typeof writeDicomSeg>[1]> = {}) => ({
      seriesUid: segUid,
      referencedSeriesUid: s.uid,
      rows: ROWS,
      columns: COLS,
      segments,
      orientation: [...s.r, ...s.c],
      pixelSpacing: PS,
      frames,
      ...extra,
    });

    it('BINARY by source image and FRACTIONAL by position become label maps voxel for voxel, on the image grid', async () => {
      const src = join(tmp, 'seg1');
      const a = { ...oblique, uid: '1.2.826.0.1.3680043.10.999.11.1' };
      const b = { ...axial, uid: '1.2.826.0.1.3680043.10.999.11.2' };
      writeSeries(join(src, 'a'), a);
      writeSeries(join(src, 'b'), b);
      writeDicomSeg(join(src, 'a-seg', 'SEG1'), segOf(a, '1.2.826.0.1.3680043.10.999.11.3', framesOf(a, 'sop', (inside) => (inside ? 1 : 0))));
      // Fractional: 128 of 255 counts as inside, 127 not; frames found by their position only.
      const frac = framesOf(b, 'position', (inside, q) => (inside ? (q % 2 ? 128 : 255) : q % 3 === 0 ? 127 : 0));
      writeDicomSeg(join(src, 'b-seg', 'SEG2'), segOf(b, '1.2.826.0.1.3680043.10.999.11.4', frac, { type: 'FRACTIONAL', maxFractional: 255 }));
      const out = join(tmp, 'seg1-out');
      const map = join(tmp, 'seg1-map.csv');
      const r = await runImportDicom({ input: src, out, map });
      expect(r.skippedFiles).toEqual([]);
      expect(r.skippedSeries).toEqual([]);
      expect(r.labels).toEqual({ used: 2, unmatched: 0, problems: [] });
      const caseOf = (uid: string) => readFileSync(map, 'utf8').split('\n').find((l) => l.includes(uid))!.split(',')[0];
      for (const s of [a, b]) {
        const image = await readNifti(join(out, 'imagesTr', `${caseOf(s.uid)}_0000.nii.gz`));
        const label = await readNifti(join(out, 'labelsTr', `${caseOf(s.uid)}.nii.gz`));
        expect(label.dims).toEqual(image.dims);
        expect(label.affine).toEqual(image.affine);
        for (let k = 0; k < SLICES; k++) for (let j = 0; j < ROWS; j++) for (let i = 0; i < COLS; i++) expect(label.data[i + COLS * (j + ROWS * k)]).toBe(mask(i, j, k));
      }
      // In MedFL's canonical RAS+ the axial label turns with its image: x and y reversed, slices kept.
      const canon = toCanonical(await readNifti(join(out, 'labelsTr', `${caseOf(b.uid)}.nii.gz`)));
      for (const [i, j, k] of [[0, 0, 0], [5, 3, 2], [7, 5, 3], [9, 8, 6]]) expect(canon.data[i + COLS * (j + ROWS * k)]).toBe(mask(COLS - 1 - i, ROWS - 1 - j, k));
      const json = JSON.parse(readFileSync(join(out, 'dataset.json'), 'utf8'));
      expect(json.labels).toEqual({ '0': 'background', '1': 'liver', '2': 'tumour' });
      let text = '';
      expect(await runCheckData(out, (t) => void (text += t))).toBe(0);
      expect(text).toMatch(/usable: 2 training/);
    });

    it('refuses overlapping segments, another grid, frames between slices and label maps, each with its reason', async () => {
      const src = join(tmp, 'seg2');
      const uid = (n: number) => `1.2.826.0.1.3680043.10.999.12.${n}`;
      const ss = [1, 2, 3, 4].map((n) => ({ ...axial, uid: uid(n) }));
      for (const [n, s] of ss.entries()) writeSeries(join(src, `s${n}`), s);
      const ones = (k: number) => ({ segment: 1, sopInstanceUid: `${uid(1)}.${k + 1}`, pixels: new Uint8Array(ROWS * COLS).fill(1) });
      writeDicomSeg(join(src, 'x', 'overlap'), segOf(ss[0], uid(11), [ones(2), { ...ones(2), segment: 2 }]));
      writeDicomSeg(join(src, 'x', 'grid'), segOf(ss[1], uid(12), [{ segment: 1, position: ss[1].p0, pixels: new Uint8Array((ROWS - 1) * COLS) }], { rows: ROWS - 1 }));
      writeDicomSeg(join(src, 'x', 'between'), segOf(ss[2], uid(13), [{ segment: 1, position: [ss[2].p0[0], ss[2].p0[1], ss[2].p0[2] + 1.2], pixels: new Uint8Array(ROWS * COLS) }]));
      writeDicomSeg(join(src, 'x', 'labelmap'), segOf(ss[3], uid(14), [{ segment: 1, position: ss[3].p0, pixels: new Uint8Array(ROWS * COLS) }], { type: 'LABELMAP' }));
      writeDicomSeg(join(src, 'x', 'orphan'), segOf({ ...axial, uid: uid(99) }, uid(15), [{ segment: 1, position: axial.p0, pixels: new Uint8Array(ROWS * COLS) }]));
      const r = await runImportDicom({ input: src, out: join(tmp, 'seg2-out') });
      expect(r.cases).toHaveLength(4);
      expect(r.labels.used).toBe(0);
      expect(r.labels.unmatched).toBe(1);
      const problems = r.labels.problems.map((p) => p.replace(/^case_\d+: /, '')).sort();
      expect(problems).toEqual([
        expect.stringMatching(/^its DICOM-SEG cannot be used \(frame 1 lies on no slice of its series/),
        expect.stringMatching(/^its DICOM-SEG cannot be used \(frames of 10×8 pixels on a series of 10×9 \(a resampled segmentation is not supported\)\)/),
        expect.stringMatching(/^its DICOM-SEG cannot be used \(segments 1 and 2 overlap on slice 3/),
      ]);
      expect(r.skippedFiles).toEqual([{ reason: 'DICOM-SEG not used: SegmentationType LABELMAP: only BINARY and FRACTIONAL segmentations are imported', files: 1 }]);
      expect(formatImportReport(r)).not.toMatch(/1\.2\.826|DOE/);
    });
  });
});

