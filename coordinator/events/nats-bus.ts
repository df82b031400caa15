/**
 * Events on a real NATS server. When the server has JetStream, a stream (MEDFL_EVENTS, subjects medfl.>)
 * keeps them as a durable audit trail. The coordinator sends through `send()` from its outbox (outbox.ts), which
 * waits for the stream's ack and tries again until it comes; the event's id goes as Nats-Msg-Id, so the stream
 * keeps one copy. When NATS goes away the client reconnects by itself and the rounds carry on meanwhile.
 */
import { connect, JSONCodec, type NatsConnection, type JetStreamClient } from 'nats';
import type { EventBus, FederationEvent } from '../../shared/events/bus.ts';
import { eventSubject } from '../../shared/events/bus.ts';
import type { Logger } from '../../shared/util/log.ts';

export const EVENT_STREAM = 'MEDFL_EVENTS';

export class NatsBus implements EventBus {
  private readonly codec = JSONCodec<FederationEvent>();
  private readonly local = new Set<(e: FederationEvent) => void>();
  dropped = 0;
  published = 0;
  /** False from a disconnect until the client has reconnected (the coordinator's /readyz reports it). */
  private connected = true;
  private readonly reconnectListeners: (() => void)[] = [];

  private constructor(
    private readonly nc: NatsConnection,
    private readonly js: JetStreamClient | undefined,
    private readonly url: string,
    private readonly log?: Logger,
  ) {}

  static async connect(url: string, opts: { log?: Logger; connectTimeoutMs?: number } = {}): Promise<NatsBus> {
    let nc: NatsConnection;
    try {
      nc = await connect({
        servers: url,
        name: 'medfl-coordinator',
        reconnect: true,
        maxReconnectAttempts: -1,
        reconnectTimeWait: 500,
        timeout: opts.connectTimeoutMs ?? 5000,
      });
    } catch (e) {
      throw new Error(`cannot reach NATS at ${url}: ${(e as Error).message}. Start nats-server there, or leave out --nats to use the in-process event bus.`);
    }
    let js: JetStreamClient | undefined;
    try {
      const jsm = await nc.jetstreamManager({ timeout: 2000 });
      try {
        await jsm.streams.info(EVENT_STREAM);
      } catch {
        await jsm.streams.add({ name: EVENT_STREAM, subjects: ['medfl.>'] });
      }
      js = nc.jetstream();
    } catch (e) {
      opts.log?.info({ url, reason: (e as Error).message }, 'NATS has no JetStream: events are published but not kept');
    }
    const bus = new NatsBus(nc, js, url, opts.log);
    void bus.watchStatus();
    return bus;
  }

  describe(): string {
    return `${this.url}${this.js ? ' (JetStream stream ' + EVENT_STREAM + ')' : ' (core NATS)'}`;
  }

  publish(event: FederationEvent): void {
    for (const h of this.local) {
      try { h(event); } catch { /* listeners must not break rounds */ }
    }
    const subject = eventSubject(event.federation, event.type);
    try {
      const data = this.codec.encode(event);
      if (this.js) {
        this.js.publish(subject, data, { timeout: 2000 }).then(
          () => { this.published++; },
          (e: Error) => this.drop(event, e),
        );
      } else {
        this.nc.publish(subject, data);
        this.published++;
      }
    } catch (e) {
      this.drop(event, e as Error);
    }
  }

  /**
   * Sends one event and resolves once NATS has it: JetStream's ack (a copy of an id already stored is acked as a
   * duplicate and kept once), or on core NATS the server's answer to a flush. Throws when it cannot; the caller retries.
   */
  async send(event: FederationEvent): Promise<void> {
    const subject = eventSubject(event.federation, event.type);
    const data = this.codec.encode(event);
    if (this.js) {
      await this.js.publish(subject, data, { ...(event.id ? { msgID: event.id } : {}), timeout: 2000 });
    } else {
      this.nc.publish(subject, data);
      await this.nc.flush();
    }
    this.published++;
  }

  onReconnect(listener: () => void): void {
    this.reconnectListeners.push(listener);
  }

  subscribe(handler: (event: FederationEvent) => void): () => void {
    this.local.add(handler);
    return () => this.local.delete(handler);
  }

  async close(): Promise<void> {
    this.local.clear();
    try {
      await this.nc.drain();
    } catch {
      await this.nc.close().catch(() => undefined);
    }
  }

  /** Connection state for readiness checks. */
  health(): { connected: boolean; closed: boolean } {
    const closed = this.nc.isClosed();
    return { connected: this.connected && !closed, closed };
  }

  private drop(event: FederationEvent, e: Error): void {
    this.dropped++;
    this.log?.warn({ type: event.type, round: event.round, reason: e.message, dropped: this.dropped }, 'event not delivered to NATS; the round goes on');
  }

  private async watchStatus(): Promise<void> {
    for await (const s of this.nc.status()) {
      if (s.type === 'disconnect') this.connected = false;
      if (s.type === 'reconnect') {
        this.connected = true;
        for (const l of this.reconnectListeners) l();
      }
      if (s.type === 'disconnect' || s.type === 'reconnect') this.log?.warn({ url: this.url, status: s.type }, `NATS ${s.type}`);
    }
  }
}
