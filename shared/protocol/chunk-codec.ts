/**
 * Hand-encoded medfl.v1.ModelChunk messages, so the coordinator can read model bytes from disk straight
 * into the buffer that becomes the message (no per-chunk allocation, no protobuf copy of `data`).
 *
 * The bytes are ordinary protobuf, fields in number order, byte for byte what protobufjs writes for the
 * same object:
 *   1 offset (varint) · 2 data (length-delimited) · 3 total_size (varint) · 4 sha256 (length-delimited)
 * `writeModelChunkHead` writes fields 1 and 2's tag and length so they end right where the data already is;
 * `modelChunkTail` is the rest, the same for every chunk of one model. The service definition
 * (shared/protocol/grpc.ts) passes such pre-encoded Buffers through its serializer unchanged.
 */

/** Room to leave before `data` for fields 1 and 2's tag and length (offset < 2^53, chunk < 2^28 B). */
export const MODEL_CHUNK_HEAD_ROOM = 16;

const TAG_OFFSET = (1 << 3) | 0;
const TAG_DATA = (2 << 3) | 2;
const TAG_TOTAL_SIZE = (3 << 3) | 0;
const TAG_SHA256 = (4 << 3) | 2;

function varintLength(v: number): number {
  let n = 1;
  while (v >= 128) {
    v = Math.floor(v / 128);
    n++;
  }
  return n;
}

function writeVarint(buf: Buffer, at: number, v: number): number {
  while (v >= 128) {
    buf[at++] = (v % 128) | 0x80;
    v = Math.floor(v / 128);
  }
  buf[at++] = v;
  return at;
}

function checkUint(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`${name} must be a non-negative safe integer, got ${v}`);
}

/**
 * Writes ModelChunk fields 1 (offset) and 2's tag and length (`dataLength`) so that they end exactly at
 * `dataStart`, where the caller has put (or will put) the chunk's bytes. Returns where the message starts.
 */
export function writeModelChunkHead(buf: Buffer, dataStart: number, offset: number, dataLength: number): number {
  checkUint('offset', offset);
  checkUint('dataLength', dataLength);
  const len = 1 + varintLength(offset) + 1 + varintLength(dataLength);
  const start = dataStart - len;
  if (start < 0) throw new RangeError(`need ${len} bytes before the data, have ${dataStart}`);
  let at = start;
  buf[at++] = TAG_OFFSET;
  at = writeVarint(buf, at, offset);
  buf[at++] = TAG_DATA;
  writeVarint(buf, at, dataLength);
  return start;
}

/** ModelChunk fields 3 (total_size) and 4 (sha256), identical for every chunk of one model. */
export function modelChunkTail(totalSize: number, sha256: string): Buffer {
  checkUint('totalSize', totalSize);
  const hash = Buffer.from(sha256, 'utf8');
  if (hash.length >= 128) throw new RangeError('sha256 field too long');
  const out = Buffer.allocUnsafe(1 + varintLength(totalSize) + 2 + hash.length);
  let at = 0;
  out[at++] = TAG_TOTAL_SIZE;
  at = writeVarint(out, at, totalSize);
  out[at++] = TAG_SHA256;
  out[at++] = hash.length;
  hash.copy(out, at);
  return out;
}
