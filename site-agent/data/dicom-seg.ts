/**
 * DICOM Segmentation objects (SEG, PS3.3 A.51) → a label volume on the grid of the series they were drawn on, for
 * `medfl site import-dicom`. Parsing is dicom-parser's; the rules are MedFL's:
 *
 *   - a SEG names its source series in ReferencedSeriesSequence; each frame is one segment on one slice;
 *   - the frame's slice is found by the image it names (DerivationImage → SourceImage → ReferencedSOPInstanceUID)
 *     when that image is in the series, else by its ImagePositionPatient projected on the series' slice normal, which
 *     must land on a slice and on its in-plane origin;
 *   - BINARY segments are bit-packed (1 bit per pixel, frames back to back); FRACTIONAL ones (8 bits, probability or
 *     occupancy up to MaximumFractionalValue) count as inside from half that value up;
 *   - segment number N becomes label value N (1..255); a voxel in two segments refuses the object, since one label
 *     map cannot hold it.
 *
 * Refused, with the reason: frames on another grid (other orientation, size or pixel spacing: a resampled
 * segmentation), frames between slices, other segmentation types, compressed pixel data.
 */
import type { DataSet, Element } from 'dicom-parser';
import { DicomError, numbers, parseDicom, type DicomGrid } from './dicom.ts';

const TAG = {
  modality: 'x00080060',
  referencedSeries: 'x00081115',
  seriesUid: 'x0020000e',
  segmentationType: 'x00620001',
  segmentSequence: 'x00620002',
  segmentNumber: 'x00620004',
  segmentLabel: 'x00620005',
  maxFractional: 'x0062000e',
  segmentIdentification: 'x0062000a',
  referencedSegmentNumber: 'x0062000b',
  frames: 'x00280008',
  rows: 'x00280010',
  columns: 'x00280011',
  bitsAllocated: 'x00280100',
  shared: 'x52009229',
  perFrame: 'x52009230',
  planeOrientation: 'x00209116',
  orientation: 'x00200037',
  planePosition: 'x00209113',
  position: 'x00200032',
  pixelMeasures: 'x00289110',
  pixelSpacing: 'x00280030',
  derivationImage: 'x00089124',
  sourceImage: 'x00082112',
  referencedSopInstance: 'x00081155',
  pixelData: 'x7fe00010',
} as const;

export interface DicomSegFrame {
  readonly segment: number;
  /** The image this frame was drawn on, when the SEG names it. */
  readonly sopInstanceUid?: string;
  /** Upper left pixel centre, LPS mm, when the SEG gives it. */
  readonly position?: readonly [number, number, number];
  readonly orientation?: readonly number[];
  readonly pixelSpacing?: readonly number[];
}

export interface DicomSeg {
  /** The series the segmentation was drawn on. */
  readonly referencedSeriesUid: string;
  readonly rows: number;
  readonly columns: number;
  /** Segment number → its label (SegmentLabel, as stored). */
  readonly segments: ReadonlyMap<number, string>;
  readonly frames: readonly DicomSegFrame[];
  /** Whether pixel p of frame f is inside its segment. */
  inside(f: number, p: number): boolean;
}

/** Whether a file's header says it is a segmentation object. */
export function isSegModality(modality: string): boolean {
  return modality === 'SEG';
}

const item = (ds: DataSet, tag: string, i = 0): DataSet | undefined => ds.elements[tag]?.items?.[i]?.dataSet;
const items = (ds: DataSet, tag: string): DataSet[] => (ds.elements[tag]?.items ?? []).flatMap((e: Element) => (e.dataSet ? [e.dataSet] : []));

/** A functional group attribute: from the frame's own groups, else from the shared ones. */
function group(frame: DataSet | undefined, shared: DataSet | undefined, seq: string): DataSet | undefined {
  return (frame && item(frame, seq)) ?? (shared && item(shared, seq));
}

/** Reads a SEG object. Throws DicomError with the reason when MedFL cannot use it. */
export function readDicomSeg(bytes: Uint8Array): DicomSeg {
  const ds = parseDicom(bytes, false);
  if ((ds.string(TAG.modality) ?? '').trim() !== 'SEG') throw new DicomError('not a segmentation object (Modality is not SEG)');
  const ref = item(ds, TAG.referencedSeries);
  const referencedSeriesUid = ref?.string(TAG.seriesUid)?.trim();
  if (!referencedSeriesUid) throw new DicomError('segmentation names no source series (ReferencedSeriesSequence (0008,1115) missing)');
  const type = (ds.string(TAG.segmentationType) ?? '').trim();
  const bits = ds.uint16(TAG.bitsAllocated);
  if (type !== 'BINARY' && type !== 'FRACTIONAL') throw new DicomError(`SegmentationType ${type || '(none)'}: only BINARY and FRACTIONAL segmentations are imported`);
  if (type === 'BINARY' && bits !== 1) throw new DicomError(`BINARY segmentation with BitsAllocated ${bits}: expected 1`);
  if (type === 'FRACTIONAL' && bits !== 8) throw new DicomError(`FRACTIONAL segmentation with BitsAllocated ${bits}: expected 8`);
  const maxFractional = type === 'FRACTIONAL' ? (ds.uint16(TAG.maxFractional) ?? 255) : 1;
  if (!(maxFractional > 0)) throw new DicomError('MaximumFractionalValue (0062,000E) is 0');
  const rows = ds.uint16(TAG.rows);
  const columns = ds.uint16(TAG.columns);
  if (!rows || !columns) throw new DicomError('Rows or Columns missing');
  const nFrames = ds.intString(TAG.frames) ?? 1;

  const segments = new Map<number, string>();
  for (const s of items(ds, TAG.segmentSequence)) {
    const number = s.uint16(TAG.segmentNumber);
    if (number === undefined) throw new DicomError('a segment without SegmentNumber (0062,0004)');
    if (number < 1 || number > 255) throw new DicomError(`segment number ${number}: label values are 1..255`);
    segments.set(number, (s.string(TAG.segmentLabel) ?? '').trim());
  }
  if (segments.size === 0) throw new DicomError('no SegmentSequence (0062,0002): the object names no segment');

  const shared = item(ds, TAG.shared);
  const perFrame = items(ds, TAG.perFrame);
  if (perFrame.length !== nFrames) throw new DicomError(`${perFrame.length} per-frame functional groups for ${nFrames} frames`);
  const frames: DicomSegFrame[] = perFrame.map((f, i) => {
    const segment = group(f, shared, TAG.segmentIdentification)?.uint16(TAG.referencedSegmentNumber);
    if (segment === undefined || !segments.has(segment)) throw new DicomError(`frame ${i + 1} names segment ${segment ?? '(none)'}, which the SegmentSequence lacks`);
    const source = f && item(f, TAG.derivationImage) ? item(item(f, TAG.derivationImage)!, TAG.sourceImage) : undefined;
    const sop = source?.string(TAG.referencedSopInstance)?.trim();
    const plane = group(f, shared, TAG.planePosition);
    const orient = group(f, shared, TAG.planeOrientation);
    const measures = group(f, shared, TAG.pixelMeasures);
    return {
      segment,
      ...(sop ? { sopInstanceUid: sop } : {}),
      ...(plane?.elements[TAG.position] ? { position: numbers(plane, TAG.position, 3, `frame ${i + 1} ImagePositionPatient`) as unknown as [number, number, number] } : {}),
      ...(orient?.elements[TAG.orientation] ? { orientation: numbers(orient, TAG.orientation, 6, `frame ${i + 1} ImageOrientationPatient`) } : {}),
      ...(measures?.elements[TAG.pixelSpacing] ? { pixelSpacing: numbers(measures, TAG.pixelSpacing, 2, `frame ${i + 1} PixelSpacing`) } : {}),
    };
  });

  const el = ds.elements[TAG.pixelData];
  if (!el) throw new DicomError('segmentation without pixel data');
  if (el.encapsulatedPixelData) throw new DicomError('encapsulated pixel data under an uncompressed transfer syntax');
  const plane = rows * columns;
  const need = type === 'BINARY' ? Math.ceil((plane * nFrames) / 8) : plane * nFrames;
  if (el.length < need) throw new DicomError(`pixel data holds ${el.length} bytes; ${nFrames} frame(s) of ${columns}×${rows} need ${need}`);
  const px = new Uint8Array(ds.byteArray.buffer, ds.byteArray.byteOffset + el.dataOffset, need);
  const threshold = maxFractional / 2;
  // BINARY: frames are packed back to back without padding, least significant bit first (PS3.5 8.1.1).
  const inside =
    type === 'BINARY'
      ? (f: number, p: number) => {
          const bit = f * plane + p;
          return ((px[bit >> 3] >> (bit & 7)) & 1) === 1;
        }
      : (f: number, p: number) => px[f * plane + p] >= threshold;
  return { referencedSeriesUid, rows, columns, segments, frames, inside };
}

const near = (a: number, b: number, tol: number) => Math.abs(a - b) <= tol;

/**
 * The label volume (x = column fastest, then row, then slice, as the series' image) of a SEG on its series' grid.
 * Throws DicomError when a frame is not on that grid or two segments claim one voxel.
 */
export function segToLabel(seg: DicomSeg, grid: DicomGrid): Uint8Array {
  if (seg.rows !== grid.rows || seg.columns !== grid.columns) {
    throw new DicomError(`frames of ${seg.columns}×${seg.rows} pixels on a series of ${grid.columns}×${grid.rows} (a resampled segmentation is not supported)`);
  }
  const plane = grid.rows * grid.columns;
  const slices = grid.sopInstanceUids.length;
  const bySop = new Map(grid.sopInstanceUids.map((u, k) => [u, k] as const).filter(([u]) => u !== ''));
  const along = (p: readonly number[]) => p[0] * grid.normal[0] + p[1] * grid.normal[1] + p[2] * grid.normal[2];
  const label = new Uint8Array(plane * slices);
  seg.frames.forEach((f, i) => {
    if (f.orientation && f.orientation.some((v, a) => !near(v, grid.orientation[a], 1e-3))) {
      throw new DicomError(`frame ${i + 1} has another orientation than its series (a resampled segmentation is not supported)`);
    }
    if (f.pixelSpacing && f.pixelSpacing.some((v, a) => !near(v, grid.pixelSpacing[a], 1e-3 * Math.max(1, v)))) {
      throw new DicomError(`frame ${i + 1} has another pixel spacing than its series (a resampled segmentation is not supported)`);
    }
    let k = f.sopInstanceUid !== undefined ? bySop.get(f.sopInstanceUid) : undefined;
    if (k === undefined) {
      if (!f.position) throw new DicomError(`frame ${i + 1} names no image of the series and has no ImagePositionPatient`);
      const t = (along(f.position) - along(grid.origin)) / grid.sliceStep;
      k = Math.round(t);
      const d = [0, 1, 2].map((a) => f.position![a] - grid.origin[a] - k! * grid.sliceStep * grid.normal[a]);
      if (k < 0 || k >= slices || !near(t, k, 0.01) || Math.hypot(d[0], d[1], d[2]) > 0.01 * Math.max(1, grid.sliceStep)) {
        throw new DicomError(`frame ${i + 1} lies on no slice of its series (position ${f.position.map((v) => +v.toFixed(3)).join('\\')})`);
      }
    }
    const base = k * plane;
    for (let p = 0; p < plane; p++) {
      if (!seg.inside(i, p)) continue;
      const prev = label[base + p];
      if (prev !== 0 && prev !== f.segment) throw new DicomError(`segments ${prev} and ${f.segment} overlap on slice ${k + 1}: one label map cannot hold both`);
      label[base + p] = f.segment;
    }
  });
  return label;
}
