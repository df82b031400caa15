/**
 * DICOM series → 3D volumes with a NIfTI affine, for `medfl site import-dicom` (cli/import-dicom.ts). Parsing of
 * the Part 10 files is dicom-parser's (cornerstonejs, the parser under the Cornerstone/OHIF viewers: element
 * parsing for every uncompressed transfer syntax, deflate included); everything geometric is done here:
 *
 *   - files are grouped by SeriesInstanceUID; every image of a series must share orientation, rows, columns,
 *     pixel spacing and pixel format, and carry one frame with one sample (grey);
 *   - slices are sorted by ImagePositionPatient projected on the slice normal n = row direction × column
 *     direction (the file names and InstanceNumber are not trusted: both are often out of order);
 *   - the slice spacing comes from those positions (SliceThickness is the slab thickness, not the step, and
 *     differs from it in overlapping reconstructions); steps that differ (missing slices, a gantry tilt, two
 *     stacks in one series) refuse the series, naming what was seen;
 *   - voxel values are RescaleSlope·stored + RescaleIntercept, per image (MR series may change slope per slice);
 *   - the affine maps voxel (i = column, j = row, k = sorted slice) to RAS+ millimetres: DICOM's patient
 *     coordinates are LPS, so x and y change sign.
 *
 * Compressed (encapsulated) transfer syntaxes are refused with their name: dicom-parser only splits their
 * fragments, and MedFL takes no image codecs in; converting such files first (e.g. `gdcmconv --raw` or `dcmdjpeg`)
 * is the documented way. Nothing here logs or returns patient identifiers: series are named by ordinal.
 */
import { createRequire } from 'node:module';
import type { DataSet } from 'dicom-parser';

type DicomParser = typeof import('dicom-parser');
const dicomParser = createRequire(import.meta.url)('dicom-parser') as DicomParser;

/** Transfer syntaxes whose pixel data is stored plainly, with its byte order. */
const NATIVE_SYNTAXES: Readonly<Record<string, { readonly name: string; readonly littleEndian: boolean }>> = {
  '1.2.840.10008.1.2': { name: 'Implicit VR Little Endian', littleEndian: true },
  '1.2.840.10008.1.2.1': { name: 'Explicit VR Little Endian', littleEndian: true },
  '1.2.840.10008.1.2.1.99': { name: 'Deflated Explicit VR Little Endian', littleEndian: true },
  '1.2.840.10008.1.2.2': { name: 'Explicit VR Big Endian', littleEndian: false },
};

/** Names of the common compressed syntaxes, for the refusal message (any other encapsulated one is named by UID). */
const COMPRESSED_NAMES: Readonly<Record<string, string>> = {
  '1.2.840.10008.1.2.4.50': 'JPEG Baseline',
  '1.2.840.10008.1.2.4.51': 'JPEG Extended',
  '1.2.840.10008.1.2.4.57': 'JPEG Lossless',
  '1.2.840.10008.1.2.4.70': 'JPEG Lossless SV1',
  '1.2.840.10008.1.2.4.80': 'JPEG-LS Lossless',
  '1.2.840.10008.1.2.4.81': 'JPEG-LS Near-Lossless',
  '1.2.840.10008.1.2.4.90': 'JPEG 2000 Lossless',
  '1.2.840.10008.1.2.4.91': 'JPEG 2000',
  '1.2.840.10008.1.2.4.201': 'HTJ2K Lossless',
  '1.2.840.10008.1.2.4.203': 'HTJ2K',
  '1.2.840.10008.1.2.5': 'RLE Lossless',
};

const TAG = {
  transferSyntax: 'x00020010',
  sopClass: 'x00080016',
  sopInstanceUid: 'x00080018',
  modality: 'x00080060',
  seriesUid: 'x0020000e',
  studyUid: 'x0020000d',
  position: 'x00200032',
  orientation: 'x00200037',
  samples: 'x00280002',
  photometric: 'x00280004',
  frames: 'x00280008',
  rows: 'x00280010',
  columns: 'x00280011',
  pixelSpacing: 'x00280030',
  bitsAllocated: 'x00280100',
  bitsStored: 'x00280101',
  pixelRepresentation: 'x00280103',
  intercept: 'x00281052',
  slope: 'x00281053',
  pixelData: 'x7fe00010',
} as const;

/** Why a file or a series was not imported (local report; never names a patient). */
export class DicomError extends Error {
  override name = 'DicomError';
}

/** One image (slice) of a series, pixel values already rescaled. */
export interface DicomSlice {
  readonly seriesUid: string;
  /** SOPInstanceUID, how a segmentation's frames name the image they were drawn on ('' when absent). */
  readonly sopInstanceUid: string;
  readonly studyUid?: string;
  /** "CT", "MR", … as stored. */
  readonly modality: string;
  readonly rows: number;
  readonly columns: number;
  /** [row spacing (between rows), column spacing (between columns)] mm, as stored. */
  readonly pixelSpacing: readonly [number, number];
  /** Row direction cosines (along a row, increasing column), then column direction cosines; LPS. */
  readonly orientation: readonly [number, number, number, number, number, number];
  /** Upper left voxel centre, LPS mm. */
  readonly position: readonly [number, number, number];
  /** rows·columns values, row by row, RescaleSlope·stored + RescaleIntercept. */
  readonly values: Float32Array;
  /** Whether every value is an integer in int16's range (the volume can be stored as int16). */
  readonly integral: boolean;
  /** Pixel format, compared across a series. */
  readonly format: string;
}

export function numbers(ds: DataSet, tag: string, n: number, what: string): number[] {
  const count = ds.numStringValues(tag);
  if (count === undefined || count < n) throw new DicomError(`${what} (${tag.slice(1, 5)},${tag.slice(5)}) missing or with fewer than ${n} values`);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const v = ds.floatString(tag, i);
    if (v === undefined || !Number.isFinite(v)) throw new DicomError(`${what} value ${i + 1} is not a number`);
    out.push(v);
  }
  return out;
}

function required(v: number | undefined, what: string): number {
  if (v === undefined) throw new DicomError(`${what} missing`);
  return v;
}

/** Whether the bytes are a DICOM Part 10 file (128-byte preamble, then "DICM"). */
export function isPart10(bytes: Uint8Array): boolean {
  return bytes.length >= 132 && bytes[128] === 0x44 && bytes[129] === 0x49 && bytes[130] === 0x43 && bytes[131] === 0x4d;
}

/** Parses a Part 10 file (up to its pixel data when `headerOnly`); refuses compressed transfer syntaxes. */
export function parseDicom(bytes: Uint8Array, headerOnly: boolean): DataSet {
  if (!isPart10(bytes)) throw new DicomError('not a DICOM Part 10 file (no "DICM" after the 128-byte preamble)');
  let ds: DataSet;
  try {
    ds = dicomParser.parseDicom(bytes, headerOnly ? { untilTag: TAG.pixelData } : {});
  } catch (e) {
    const msg = e instanceof Error ? e.message : typeof e === 'string' ? e : ((e as { exception?: string })?.exception ?? String(e));
    throw new DicomError(`cannot parse (${msg})`);
  }
  checkSyntax(ds);
  return ds;
}

function checkSyntax(ds: DataSet): void {
  const syntax = ds.string(TAG.transferSyntax) ?? '';
  if (NATIVE_SYNTAXES[syntax]) return;
  const name = COMPRESSED_NAMES[syntax];
  throw new DicomError(
    `compressed transfer syntax ${name ? `${name} (${syntax})` : syntax || '(none given)'}: MedFL reads uncompressed DICOM only; ` +
      'decompress first, e.g. `gdcmconv --raw IN OUT` or `dcmdjpeg IN OUT`',
  );
}

/**
 * The series a file belongs to, from its header alone (the pixel data is not read): the importer groups files
 * first and reads one series' pixels at a time, so memory stays at one series. Refuses what readDicomSlice would
 * refuse for the file's encoding (not Part 10, compressed).
 */
export function readDicomSeriesKey(bytes: Uint8Array): { readonly seriesUid: string; readonly modality: string } {
  const ds = parseDicom(bytes, true);
  const seriesUid = ds.string(TAG.seriesUid);
  if (!seriesUid) throw new DicomError('SeriesInstanceUID (0020,000E) missing');
  return { seriesUid, modality: (ds.string(TAG.modality) ?? 'OT').trim() };
}

/**
 * One DICOM Part 10 file → a slice. Throws DicomError with the reason when the file is not an image MedFL can
 * use: compressed pixel data, colour, several frames, no geometry.
 */
export function readDicomSlice(bytes: Uint8Array): DicomSlice {
  const ds = parseDicom(bytes, false);
  const syntax = ds.string(TAG.transferSyntax) ?? '';
  const native = NATIVE_SYNTAXES[syntax];
  if (ds.elements[TAG.pixelData] === undefined) throw new DicomError('no pixel data (not an image: a report, a segmentation or a presentation state?)');
  if (ds.elements[TAG.pixelData].encapsulatedPixelData) throw new DicomError('encapsulated pixel data under an uncompressed transfer syntax');
  const seriesUid = ds.string(TAG.seriesUid);
  if (!seriesUid) throw new DicomError('SeriesInstanceUID (0020,000E) missing');
  const frames = ds.intString(TAG.frames) ?? 1;
  if (frames !== 1) throw new DicomError(`${frames} frames in one file (enhanced multi-frame DICOM is not supported; export the series as single-frame images)`);
  const samples = ds.uint16(TAG.samples) ?? 1;
  const photometric = (ds.string(TAG.photometric) ?? 'MONOCHROME2').trim();
  if (samples !== 1 || (photometric !== 'MONOCHROME2' && photometric !== 'MONOCHROME1')) {
    throw new DicomError(`${photometric} with ${samples} sample(s) per pixel: only greyscale (MONOCHROME2) images are imported`);
  }
  if (photometric === 'MONOCHROME1') throw new DicomError('MONOCHROME1 (inverted greyscale, e.g. radiographs): not a CT/MR volume MedFL imports');
  const rows = required(ds.uint16(TAG.rows), 'Rows (0028,0010)');
  const columns = required(ds.uint16(TAG.columns), 'Columns (0028,0011)');
  const bitsAllocated = required(ds.uint16(TAG.bitsAllocated), 'BitsAllocated (0028,0100)');
  const bitsStored = ds.uint16(TAG.bitsStored) ?? bitsAllocated;
  const signed = (ds.uint16(TAG.pixelRepresentation) ?? 0) === 1;
  if (bitsAllocated !== 8 && bitsAllocated !== 16 && bitsAllocated !== 32) throw new DicomError(`BitsAllocated ${bitsAllocated}: expected 8, 16 or 32`);
  if (bitsStored < 1 || bitsStored > bitsAllocated) throw new DicomError(`BitsStored ${bitsStored} does not fit BitsAllocated ${bitsAllocated}`);
  const spacing = numbers(ds, TAG.pixelSpacing, 2, 'PixelSpacing');
  if (spacing.some((s) => !(s > 0))) throw new DicomError(`PixelSpacing ${spacing.join('\\')}: must be positive`);
  const orientation = numbers(ds, TAG.orientation, 6, 'ImageOrientationPatient');
  const position = numbers(ds, TAG.position, 3, 'ImagePositionPatient');
  const r = orientation.slice(0, 3);
  const c = orientation.slice(3, 6);
  const norm = (v: number[]) => Math.hypot(v[0], v[1], v[2]);
  if (Math.abs(norm(r) - 1) > 1e-3 || Math.abs(norm(c) - 1) > 1e-3 || Math.abs(r[0] * c[0] + r[1] * c[1] + r[2] * c[2]) > 1e-3) {
    throw new DicomError('ImageOrientationPatient is not two orthogonal unit vectors');
  }
  const slope = ds.floatString(TAG.slope) ?? 1;
  const intercept = ds.floatString(TAG.intercept) ?? 0;
  if (!Number.isFinite(slope) || slope === 0 || !Number.isFinite(intercept)) throw new DicomError(`RescaleSlope ${slope} / RescaleIntercept ${intercept} unusable`);

  const el = ds.elements[TAG.pixelData];
  const n = rows * columns;
  const bytesPer = bitsAllocated / 8;
  if (el.length < n * bytesPer) throw new DicomError(`pixel data holds ${el.length} bytes; ${rows}×${columns} at ${bitsAllocated} bits needs ${n * bytesPer}`);
  const view = new DataView(ds.byteArray.buffer, ds.byteArray.byteOffset + el.dataOffset, n * bytesPer);
  const values = new Float32Array(n);
  const le = native.littleEndian;
  // Stored bits below BitsAllocated: the value is the low bitsStored bits (sign-extended when signed); the rest
  // may hold overlay bits or garbage.
  const shift = 32 - bitsStored;
  let integral = Number.isInteger(slope) && Number.isInteger(intercept);
  for (let i = 0; i < n; i++) {
    let raw: number;
    if (bytesPer === 1) raw = view.getUint8(i);
    else if (bytesPer === 2) raw = view.getUint16(2 * i, le);
    else raw = view.getUint32(4 * i, le);
    raw = signed ? (raw << shift) >> shift : bitsStored === 32 ? raw >>> 0 : raw & ((1 << bitsStored) - 1);
    const v = raw * slope + intercept;
    values[i] = v;
    if (integral && (v < -32768 || v > 32767)) integral = false;
  }
  return {
    seriesUid,
    sopInstanceUid: (ds.string(TAG.sopInstanceUid) ?? '').trim(),
    ...(ds.string(TAG.studyUid) ? { studyUid: ds.string(TAG.studyUid) } : {}),
    modality: (ds.string(TAG.modality) ?? 'OT').trim(),
    rows,
    columns,
    pixelSpacing: [spacing[0], spacing[1]],
    orientation: orientation as unknown as DicomSlice['orientation'],
    position: position as unknown as DicomSlice['position'],
    values,
    integral,
    format: `${bitsAllocated}/${bitsStored}/${signed ? 's' : 'u'}`,
  };
}

/** A series assembled into a volume: data x fastest ([X, Y, Z] = columns, rows, slices), affine RAS+ mm. */
export interface DicomVolume {
  readonly modality: string;
  readonly dims: readonly [number, number, number];
  readonly spacing: readonly [number, number, number];
  /** 4×4 voxel → RAS+ world (mm). */
  readonly affine: number[][];
  readonly data: Float32Array | Int16Array;
  readonly slices: number;
  /** Where the slices lie, in DICOM's LPS terms, for placing a segmentation's frames on them. */
  readonly grid: DicomGrid;
}

/** A series' voxel grid as DICOM states it (LPS), slice k at origin + k·sliceStep·normal. */
export interface DicomGrid {
  readonly rows: number;
  readonly columns: number;
  readonly orientation: readonly [number, number, number, number, number, number];
  readonly pixelSpacing: readonly [number, number];
  readonly normal: readonly [number, number, number];
  readonly origin: readonly [number, number, number];
  readonly sliceStep: number;
  /** SOPInstanceUID of slice k ('' when the image had none). */
  readonly sopInstanceUids: readonly string[];
}

/** Relative tolerance on slice steps (1 %), with a floor of 0.01 mm, as converters allow rounding in positions. */
const STEP_TOLERANCE = 0.01;

/**
 * The slices of one series → a volume. Throws DicomError naming the fault: fewer than two slices, images that
 * differ in orientation/size/spacing/format, slices not stacked along the normal (gantry tilt), two images at one
 * position, missing slices or otherwise uneven steps.
 */
export function assembleSeries(slices: readonly DicomSlice[]): DicomVolume {
  if (slices.length < 2) throw new DicomError(`${slices.length} image(s): a volume needs at least two slices`);
  const s0 = slices[0];
  for (const s of slices) {
    if (s.rows !== s0.rows || s.columns !== s0.columns) throw new DicomError(`images of ${s0.columns}×${s0.rows} and ${s.columns}×${s.rows} pixels in one series`);
    if (s.orientation.some((v, i) => Math.abs(v - s0.orientation[i]) > 1e-4)) {
      throw new DicomError('images with different orientations in one series (a localiser or a multi-planar series?)');
    }
    if (s.pixelSpacing.some((v, i) => Math.abs(v - s0.pixelSpacing[i]) > 1e-4 * Math.max(1, v))) throw new DicomError('images with different pixel spacings in one series');
    if (s.format !== s0.format) throw new DicomError('images with different pixel formats in one series');
    if (s.modality !== s0.modality) throw new DicomError(`images of modality ${s0.modality} and ${s.modality} in one series`);
  }
  const [r0, r1, r2, c0, c1, c2] = s0.orientation;
  const n = [r1 * c2 - r2 * c1, r2 * c0 - r0 * c2, r0 * c1 - r1 * c0];
  const along = (p: readonly number[]) => p[0] * n[0] + p[1] * n[1] + p[2] * n[2];
  const sorted = [...slices].sort((a, b) => along(a.position) - along(b.position));
  const steps = sorted.slice(1).map((s, i) => along(s.position) - along(sorted[i].position));
  const fmt = (v: number) => +v.toFixed(3);
  if (steps.some((d) => Math.abs(d) < 1e-3)) {
    throw new DicomError(`${steps.filter((d) => Math.abs(d) < 1e-3).length + 1} images share one slice position (several echoes, phases or acquisitions in one series?)`);
  }
  const sortedSteps = [...steps].sort((a, b) => a - b);
  const median = sortedSteps[Math.floor(sortedSteps.length / 2)];
  const tol = Math.max(0.01, STEP_TOLERANCE * median);
  const gaps = steps.filter((d) => d > median + tol);
  if (gaps.length > 0 && gaps.every((d) => Math.abs(d / median - Math.round(d / median)) * median <= tol)) {
    const missing = gaps.reduce((a, d) => a + Math.round(d / median) - 1, 0);
    throw new DicomError(`${missing} slice(s) missing: steps of ${gaps.map(fmt).join(', ')} mm where the series steps ${fmt(median)} mm`);
  }
  if (steps.some((d) => Math.abs(d - median) > tol)) {
    throw new DicomError(`uneven slice spacing: steps from ${fmt(sortedSteps[0])} to ${fmt(sortedSteps[sortedSteps.length - 1])} mm (variable-thickness reconstruction?)`);
  }
  // Every slice must sit on the normal through the first: an in-plane offset is a gantry tilt (sheared volume).
  const p0 = sorted[0].position;
  for (const s of sorted) {
    const d = [s.position[0] - p0[0], s.position[1] - p0[1], s.position[2] - p0[2]];
    const a = along(s.position) - along(p0);
    const off = Math.hypot(d[0] - a * n[0], d[1] - a * n[1], d[2] - a * n[2]);
    if (off > Math.max(0.01, 0.01 * Math.abs(a))) throw new DicomError(`slices are not stacked along their normal (offset ${fmt(off)} mm: gantry tilt?); resample the series to an untilted grid first`);
  }
  const dz = steps.reduce((a, v) => a + v, 0) / steps.length;
  const [rowSpacing, colSpacing] = s0.pixelSpacing;
  // NIfTI is RAS+, DICOM LPS: x and y flip sign. Columns of the affine: i (along a row), j (down a column), k (slices).
  const lpsToRas = [-1, -1, 1];
  const affine = [0, 1, 2].map((a) => [lpsToRas[a] * [r0, r1, r2][a] * colSpacing, lpsToRas[a] * [c0, c1, c2][a] * rowSpacing, lpsToRas[a] * n[a] * dz, lpsToRas[a] * p0[a]]);
  affine.push([0, 0, 0, 1]);
  const plane = s0.rows * s0.columns;
  const integral = sorted.every((s) => s.integral);
  const data = integral ? new Int16Array(plane * sorted.length) : new Float32Array(plane * sorted.length);
  sorted.forEach((s, k) => data.set(s.values, k * plane));
  const grid: DicomGrid = {
    rows: s0.rows,
    columns: s0.columns,
    orientation: s0.orientation,
    pixelSpacing: s0.pixelSpacing,
    normal: n as [number, number, number],
    origin: p0,
    sliceStep: dz,
    sopInstanceUids: sorted.map((s) => s.sopInstanceUid),
  };
  return { modality: s0.modality, dims: [s0.columns, s0.rows, sorted.length], spacing: [colSpacing, rowSpacing, dz], affine, data, slices: sorted.length, grid };
}

/** dataset.json channel name for a DICOM Modality: "CT" stays CT (MedFL then uses the HU window), MR → "MRI". */
export function channelNameOf(modality: string): string {
  if (modality === 'CT') return 'CT';
  if (modality === 'MR') return 'MRI';
  return modality;
}
