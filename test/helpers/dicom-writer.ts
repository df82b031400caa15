/**
 * A minimal DICOM Part 10 writer for tests: explicit VR little endian (or, for refusal tests, a compressed
 * transfer syntax with encapsulated pixel data), the file meta group, and the handful of image attributes a CT/MR
 * slice needs. Written from the standard's encoding rules (PS3.5 §7.1.2, §A.4): elements in tag order, values
 * padded to even length, OB/OW/SQ/UN/UT with a 4-byte length after two reserved bytes.
 */
import { writeFileSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';

export const EXPLICIT_LE = '1.2.840.10008.1.2.1';
export const JPEG_BASELINE = '1.2.840.10008.1.2.4.50';
const CT_IMAGE_STORAGE = '1.2.840.10008.5.1.4.1.1.2';

type Value = { vr: string; bytes: Uint8Array } | { vr: 'OB'; encapsulated: Uint8Array[] };

const LONG_VRS = new Set(['OB', 'OW', 'OF', 'SQ', 'UT', 'UN']);

function text(vr: string, s: string): { vr: string; bytes: Uint8Array } {
  const pad = s.length % 2 === 1 ? (vr === 'UI' ? '\0' : ' ') : '';
  return { vr, bytes: new Uint8Array(Buffer.from(s + pad, 'latin1')) };
}

function us(v: number): { vr: string; bytes: Uint8Array } {
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, v, true);
  return { vr: 'US', bytes: b };
}

function ul(v: number): { vr: string; bytes: Uint8Array } {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v, true);
  return { vr: 'UL', bytes: b };
}

function element(group: number, elem: number, v: Value): Uint8Array {
  const head = (vr: string, len: number): Uint8Array => {
    const long = LONG_VRS.has(vr);
    const h = new Uint8Array(long ? 12 : 8);
    const dv = new DataView(h.buffer);
    dv.setUint16(0, group, true);
    dv.setUint16(2, elem, true);
    h[4] = vr.charCodeAt(0);
    h[5] = vr.charCodeAt(1);
    if (long) dv.setUint32(8, len, true);
    else dv.setUint16(6, len, true);
    return h;
  };
  if ('encapsulated' in v) {
    const item = (g: number, e: number, len: number) => {
      const b = new Uint8Array(8);
      const dv = new DataView(b.buffer);
      dv.setUint16(0, g, true);
      dv.setUint16(2, e, true);
      dv.setUint32(4, len, true);
      return b;
    };
    const parts: Uint8Array[] = [head('OB', 0xffffffff), item(0xfffe, 0xe000, 0)];
    for (const f of v.encapsulated) parts.push(item(0xfffe, 0xe000, f.length), f);
    parts.push(item(0xfffe, 0xe0dd, 0));
    return Buffer.concat(parts);
  }
  return Buffer.concat([head(v.vr, v.bytes.length), v.bytes]);
}

export interface SliceSpec {
  readonly seriesUid: string;
  readonly studyUid?: string;
  readonly sopInstanceUid: string;
  readonly modality?: string;
  readonly rows: number;
  readonly columns: number;
  /** [row spacing, column spacing] mm. */
  readonly pixelSpacing: readonly [number, number];
  readonly orientation: readonly number[];
  readonly position: readonly number[];
  /** Stored values, row by row (rows·columns). */
  readonly stored: Int16Array | Uint16Array;
  readonly signed?: boolean;
  readonly bitsStored?: number;
  readonly slope?: number;
  readonly intercept?: number;
  readonly instanceNumber?: number;
  readonly patientName?: string;
  readonly transferSyntax?: string;
}

const ds = (v: number): string => {
  // DS is at most 16 characters.
  let s = String(v);
  if (s.length > 16) s = v.toPrecision(10).replace(/0+e/, 'e').replace(/\.?0+$/, '');
  return s;
};

/** Encode one slice as a DICOM Part 10 file. */
export function encodeDicomSlice(s: SliceSpec): Uint8Array {
  const syntax = s.transferSyntax ?? EXPLICIT_LE;
  const metaElems: [number, Value][] = [
    [0x0001, { vr: 'OB', bytes: new Uint8Array([0, 1]) }],
    [0x0002, text('UI', CT_IMAGE_STORAGE)],
    [0x0003, text('UI', s.sopInstanceUid)],
    [0x0010, text('UI', syntax)],
    [0x0012, text('UI', '1.2.826.0.1.3680043.10.999.1')],
  ];
  const meta = Buffer.concat(metaElems.map(([e, v]) => element(0x0002, e, v)));
  const pixels = new Uint8Array(s.stored.buffer, s.stored.byteOffset, s.stored.byteLength);
  const body: [number, number, Value][] = [
    [0x0008, 0x0016, text('UI', CT_IMAGE_STORAGE)],
    [0x0008, 0x0018, text('UI', s.sopInstanceUid)],
    [0x0008, 0x0060, text('CS', s.modality ?? 'CT')],
    [0x0010, 0x0010, text('PN', s.patientName ?? 'DOE^JANE')],
    [0x0020, 0x000d, text('UI', s.studyUid ?? '1.2.826.0.1.3680043.10.999.2')],
    [0x0020, 0x000e, text('UI', s.seriesUid)],
    [0x0020, 0x0013, text('IS', String(s.instanceNumber ?? 1))],
    [0x0020, 0x0032, text('DS', s.position.map(ds).join('\\'))],
    [0x0020, 0x0037, text('DS', s.orientation.map(ds).join('\\'))],
    [0x0028, 0x0002, us(1)],
    [0x0028, 0x0004, text('CS', 'MONOCHROME2')],
    [0x0028, 0x0010, us(s.rows)],
    [0x0028, 0x0011, us(s.columns)],
    [0x0028, 0x0030, text('DS', s.pixelSpacing.map(ds).join('\\'))],
    [0x0028, 0x0100, us(16)],
    [0x0028, 0x0101, us(s.bitsStored ?? 16)],
    [0x0028, 0x0102, us((s.bitsStored ?? 16) - 1)],
    [0x0028, 0x0103, us(s.signed ? 1 : 0)],
    [0x0028, 0x1052, text('DS', ds(s.intercept ?? 0))],
    [0x0028, 0x1053, text('DS', ds(s.slope ?? 1))],
    [0x7fe0, 0x0010, syntax === EXPLICIT_LE ? { vr: 'OW', bytes: pixels } : { vr: 'OB', encapsulated: [new Uint8Array([0xff, 0xd8, 0xff, 0xd9])] }],
  ];
  const data = Buffer.concat(body.map(([g, e, v]) => element(g, e, v)));
  const preamble = new Uint8Array(128);
  return Buffer.concat([preamble, Buffer.from('DICM', 'latin1'), element(0x0002, 0x0000, ul(meta.length)), meta, data]);
}

export function writeDicomSlice(path: string, s: SliceSpec): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, encodeDicomSlice(s));
}

const SEGMENTATION_STORAGE = '1.2.840.10008.5.1.4.1.1.66.4';

/** A dataset (elements in tag order) as bytes, for sequence items. */
function dataset(elems: [number, number, Value][]): Uint8Array {
  return Buffer.concat([...elems].sort((a, b) => a[0] - b[0] || a[1] - b[1]).map(([g, e, v]) => element(g, e, v)));
}

/** A sequence of items with defined lengths. */
function sq(itemsBytes: Uint8Array[]): { vr: string; bytes: Uint8Array } {
  const parts: Uint8Array[] = [];
  for (const it of itemsBytes) {
    const h = new Uint8Array(8);
    const dv = new DataView(h.buffer);
    dv.setUint16(0, 0xfffe, true);
    dv.setUint16(2, 0xe000, true);
    dv.setUint32(4, it.length, true);
    parts.push(h, it);
  }
  return { vr: 'SQ', bytes: Buffer.concat(parts) };
}

export interface SegFrameSpec {
  readonly segment: number;
  /** The source image's SOPInstanceUID (DerivationImageSequence), when given. */
  readonly sopInstanceUid?: string;
  /** PlanePositionSequence's ImagePositionPatient, when given. */
  readonly position?: readonly number[];
  /** rows·columns values, row by row: 0/1 for BINARY, 0..maxFractional for FRACTIONAL. */
  readonly pixels: Uint8Array;
}

export interface SegSpec {
  readonly seriesUid: string;
  readonly referencedSeriesUid: string;
  readonly rows: number;
  readonly columns: number;
  readonly type?: 'BINARY' | 'FRACTIONAL' | 'LABELMAP';
  readonly maxFractional?: number;
  readonly segments: readonly { readonly number: number; readonly label: string }[];
  readonly orientation: readonly number[];
  readonly pixelSpacing: readonly [number, number];
  readonly frames: readonly SegFrameSpec[];
}

/** Encode a DICOM Segmentation object (PS3.3 A.51): explicit VR little endian, bit-packed when BINARY. */
export function encodeDicomSeg(s: SegSpec): Uint8Array {
  const type = s.type ?? 'BINARY';
  const bits = type === 'FRACTIONAL' ? 8 : type === 'BINARY' ? 1 : 8;
  const plane = s.rows * s.columns;
  let pixels: Uint8Array;
  if (bits === 1) {
    pixels = new Uint8Array(Math.ceil((plane * s.frames.length) / 8));
    s.frames.forEach((f, i) => f.pixels.forEach((v, p) => {
      const bit = i * plane + p;
      if (v) pixels[bit >> 3] |= 1 << (bit & 7);
    }));
  } else {
    pixels = Buffer.concat(s.frames.map((f) => f.pixels));
  }
  if (pixels.length % 2 === 1) pixels = Buffer.concat([pixels, new Uint8Array(1)]);
  const sop = `${s.seriesUid}.1`;
  const metaElems: [number, Value][] = [
    [0x0001, { vr: 'OB', bytes: new Uint8Array([0, 1]) }],
    [0x0002, text('UI', SEGMENTATION_STORAGE)],
    [0x0003, text('UI', sop)],
    [0x0010, text('UI', EXPLICIT_LE)],
    [0x0012, text('UI', '1.2.826.0.1.3680043.10.999.1')],
  ];
  const meta = Buffer.concat(metaElems.map(([e, v]) => element(0x0002, e, v)));
  const shared = dataset([
    [0x0020, 0x9116, sq([dataset([[0x0020, 0x0037, text('DS', s.orientation.map(ds).join('\\'))]])])],
    [0x0028, 0x9110, sq([dataset([[0x0028, 0x0030, text('DS', s.pixelSpacing.map(ds).join('\\'))]])])],
  ]);
  const perFrame = s.frames.map((f) => {
    const elems: [number, number, Value][] = [[0x0062, 0x000a, sq([dataset([[0x0062, 0x000b, us(f.segment)]])])]];
    if (f.sopInstanceUid) {
      const source = dataset([
        [0x0008, 0x1150, text('UI', CT_IMAGE_STORAGE)],
        [0x0008, 0x1155, text('UI', f.sopInstanceUid)],
      ]);
      elems.push([0x0008, 0x9124, sq([dataset([[0x0008, 0x2112, sq([source])]])])]);
    }
    if (f.position) elems.push([0x0020, 0x9113, sq([dataset([[0x0020, 0x0032, text('DS', f.position.map(ds).join('\\'))]])])]);
    return dataset(elems);
  });
  const segments = s.segments.map((g) =>
    dataset([
      [0x0062, 0x0004, us(g.number)],
      [0x0062, 0x0005, text('LO', g.label)],
      [0x0062, 0x0008, text('CS', 'MANUAL')],
    ]),
  );
  const body = dataset([
    [0x0008, 0x0016, text('UI', SEGMENTATION_STORAGE)],
    [0x0008, 0x0018, text('UI', sop)],
    [0x0008, 0x0060, text('CS', 'SEG')],
    [0x0008, 0x1115, sq([dataset([[0x0020, 0x000e, text('UI', s.referencedSeriesUid)]])])],
    [0x0010, 0x0010, text('PN', 'DOE^JANE')],
    [0x0020, 0x000e, text('UI', s.seriesUid)],
    [0x0028, 0x0002, us(1)],
    [0x0028, 0x0004, text('CS', 'MONOCHROME2')],
    [0x0028, 0x0008, text('IS', String(s.frames.length))],
    [0x0028, 0x0010, us(s.rows)],
    [0x0028, 0x0011, us(s.columns)],
    [0x0028, 0x0100, us(bits)],
    [0x0028, 0x0101, us(bits)],
    [0x0028, 0x0102, us(bits - 1)],
    [0x0028, 0x0103, us(0)],
    [0x0062, 0x0001, text('CS', type)],
    [0x0062, 0x0002, sq(segments)],
    ...(type === 'FRACTIONAL' ? ([[0x0062, 0x000e, us(s.maxFractional ?? 255)]] as [number, number, Value][]) : []),
    [0x5200, 0x9229, sq([shared])],
    [0x5200, 0x9230, sq(perFrame)],
    [0x7fe0, 0x0010, { vr: 'OB', bytes: pixels }],
  ]);
  return Buffer.concat([new Uint8Array(128), Buffer.from('DICM', 'latin1'), element(0x0002, 0x0000, ul(meta.length)), meta, body]);
}

export function writeDicomSeg(path: string, s: SegSpec): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(path, encodeDicomSeg(s));
}
