/**
 * A userspace TCP relay that plays a WAN link between a site and the coordinator (netem needs privileges this
 * machine does not give): each direction is a FIFO bottleneck of a given rate with a bounded queue, followed by a
 * fixed one-way delay of half the round trip.
 *
 * Model: a piece read at time t starts transmitting when the link is free, takes bytes / rate, and is delivered one
 * propagation delay later. When more than `queueBytes` wait for transmission the relay stops reading that side
 * (TCP back-pressure, as a router's full buffer would drop and make the sender back off). TCP itself runs on
 * loopback at both ends, so what the link tests is the application's own windows (HTTP/2 flow control), not a
 * congestion controller's response to loss.
 *
 * Used by bench/wan.ts (npm run bench:wan) and by the transport tests (a slow link, a path that goes silent, a cut).
 */
import * as net from 'node:net';
import { performance } from 'node:perf_hooks';

export interface LinkDirection {
  /** Bottleneck rate in bits per second; 0 = unshaped. */
  bitsPerSecond: number;
  /** One-way delay in ms (half the round trip). */
  delayMs: number;
  /** Bytes allowed to wait for transmission before the relay stops reading (default: one round trip of the rate, at least 256 KiB). */
  queueBytes?: number;
}

export interface LinkShape {
  /** Site → coordinator. */
  up: LinkDirection;
  /** Coordinator → site. */
  down: LinkDirection;
}

/** A symmetric link: `mbit` Mbit/s each way, `rttMs` of round trip. */
export function link(mbit: number, rttMs: number): LinkShape {
  const d: LinkDirection = { bitsPerSecond: mbit * 1e6, delayMs: rttMs / 2 };
  return { up: { ...d }, down: { ...d } };
}

export interface ShapedRelay {
  port: number;
  /** TCP connections accepted so far. */
  readonly connections: number;
  /** Bytes delivered each way so far. */
  readonly bytes: { up: number; down: number };
  /** When (ms since the epoch, sub-ms) the bytes delivered in `direction` first reached `total`; undefined if not yet. */
  reachedAt(direction: 'up' | 'down', total: number): number | undefined;
  /** Drops every open connection at once (as a reset would). */
  cut(): void;
  /** From now on nothing gets through either way, but no connection closes: a path that died silently. */
  silence(): void;
  /** Lets traffic through again after silence() (open connections stay silent: their bytes were lost). */
  restore(): void;
  close(): Promise<void>;
}

interface Piece {
  buf: Buffer;
  deliverAt: number;
}

/** One direction of one connection. */
class Pipe {
  private readonly queue: Piece[] = [];
  private txFreeAt = 0;
  private timer: NodeJS.Timeout | undefined;
  private resumeTimer: NodeJS.Timeout | undefined;
  private paused = false;
  private readonly bytesPerMs: number;
  private readonly queueBytes: number;

  constructor(
    private readonly src: net.Socket,
    private readonly dst: net.Socket,
    private readonly d: LinkDirection,
    private readonly dropping: () => boolean,
    private readonly counted: (n: number) => void,
  ) {
    this.bytesPerMs = d.bitsPerSecond > 0 ? d.bitsPerSecond / 8 / 1000 : Number.POSITIVE_INFINITY;
    this.queueBytes = d.queueBytes ?? Math.max(256 * 1024, Number.isFinite(this.bytesPerMs) ? this.bytesPerMs * 2 * d.delayMs : 0);
    src.on('data', (buf: Buffer) => this.take(buf));
    src.on('end', () => this.whenEmpty(() => dst.end()));
  }

  private take(buf: Buffer): void {
    if (this.dropping()) return;
    const now = performance.now();
    const start = Math.max(now, this.txFreeAt);
    this.txFreeAt = start + buf.length / this.bytesPerMs;
    this.queue.push({ buf, deliverAt: this.txFreeAt + this.d.delayMs });
    this.schedule();
    const backlog = (this.txFreeAt - now) * this.bytesPerMs;
    if (!this.paused && backlog > this.queueBytes) {
      this.paused = true;
      this.src.pause();
      // Resume once half the queue has been transmitted.
      const at = this.txFreeAt - this.queueBytes / 2 / this.bytesPerMs;
      this.resumeTimer = setTimeout(() => {
        this.paused = false;
        if (!this.src.destroyed) this.src.resume();
      }, Math.max(0, at - now));
    }
  }

  private schedule(): void {
    if (this.timer || this.queue.length === 0) return;
    const wait = Math.max(0, this.queue[0]!.deliverAt - performance.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.deliver();
    }, wait);
  }

  private deliver(): void {
    const now = performance.now();
    while (this.queue.length > 0 && this.queue[0]!.deliverAt <= now + 0.5) {
      const { buf } = this.queue.shift()!;
      if (this.dropping() || this.dst.destroyed) continue;
      this.dst.write(buf);
      this.counted(buf.length);
    }
    this.schedule();
    if (this.queue.length === 0) this.onEmpty?.();
  }

  private onEmpty: (() => void) | undefined;
  private whenEmpty(f: () => void): void {
    if (this.queue.length === 0) return f();
    this.onEmpty = f;
  }

  stop(): void {
    clearTimeout(this.timer);
    clearTimeout(this.resumeTimer);
    this.queue.length = 0;
  }
}

export async function startShapedRelay(upstream: { host: string; port: number }, shape: LinkShape, listenHost = '127.0.0.1'): Promise<ShapedRelay> {
  const sockets = new Set<net.Socket>();
  const pipes = new Set<Pipe>();
  /** Per connection: true once its bytes are being lost (it was open, or opened, while the path was silent). */
  const dead = new Set<{ dead: boolean }>();
  let connections = 0;
  let silent = false;
  const bytes = { up: 0, down: 0 };
  // Cumulative bytes and time of every delivery, per direction (for reachedAt).
  const log = { up: [] as [number, number][], down: [] as [number, number][] };
  const note = (dir: 'up' | 'down', n: number) => {
    bytes[dir] += n;
    log[dir].push([bytes[dir], performance.timeOrigin + performance.now()]);
  };
  const server = net.createServer((client) => {
    connections++;
    const state = { dead: silent };
    dead.add(state);
    client.on('close', () => dead.delete(state));
    const dropping = () => state.dead;
    const server = net.connect(upstream.port, upstream.host);
    for (const s of [client, server]) {
      sockets.add(s);
      s.setNoDelay(true);
      s.on('error', () => undefined);
      s.on('close', () => {
        sockets.delete(s);
        (s === client ? server : client).destroy();
      });
    }
    const up = new Pipe(client, server, shape.up, dropping, (n) => note('up', n));
    const down = new Pipe(server, client, shape.down, dropping, (n) => note('down', n));
    pipes.add(up);
    pipes.add(down);
    client.on('close', () => {
      up.stop();
      down.stop();
      pipes.delete(up);
      pipes.delete(down);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, listenHost, resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    get connections() {
      return connections;
    },
    bytes,
    reachedAt(direction, total) {
      return log[direction].find(([n]) => n >= total)?.[1];
    },
    cut() {
      for (const s of sockets) s.destroy();
    },
    silence() {
      silent = true;
      for (const c of dead) c.dead = true;
    },
    restore() {
      silent = false;
    },
    close() {
      for (const s of sockets) s.destroy();
      for (const p of pipes) p.stop();
      return new Promise((resolve) => server.close(() => resolve()));
    },
  };
}
