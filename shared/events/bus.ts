/**
 * The event seam: the coordinator announces what happens (round started/closed, site joined/left,
 * update accepted/rejected) to whoever listens. Publishing never throws into the caller and never
 * blocks a round; the coordinator keeps each event in its store's outbox until NATS has it (coordinator/events/outbox.ts).
 */
export type FederationEventType =
  | 'round.started'
  | 'round.closed'
  | 'round.failed'
  | 'site.joined'
  | 'site.left'
  | 'site.enrolled'
  | 'update.accepted'
  | 'update.rejected'
  | 'update.flagged'
  | 'model.rolled_back'
  | 'task.declined'
  /** The coordinator did not send a selected site its task: the site lacks a protocol feature the task needs. */
  | 'task.withheld'
  | 'teacher.promoted'
  /** No round opens: the next one would take ε past the plan's privacy.epsilonBudget (the federation then finishes). */
  | 'privacy.budget_exhausted'
  | 'federation.finished';

export interface FederationEvent {
  /**
   * Stable per fact (the coordinator's outbox sends it as Nats-Msg-Id): the same update, round close or failure
   * always has the same id, so a consumer or JetStream can drop a copy sent again.
   */
  readonly id?: string;
  readonly type: FederationEventType;
  readonly federation: string;
  readonly at: string;
  readonly round?: number;
  readonly site?: string;
  readonly [key: string]: unknown;
}

export interface EventBus {
  /** What this bus is, for logs and `medfl status` (e.g. "in-process", "nats://127.0.0.1:4222 (JetStream)"). */
  describe(): string;
  publish(event: FederationEvent): void;
  /** Returns an unsubscribe function. */
  subscribe(handler: (event: FederationEvent) => void): () => void;
  close(): Promise<void>;
}

/** The embedded default: listeners in this process only. */
export class InProcessBus implements EventBus {
  private readonly handlers = new Set<(e: FederationEvent) => void>();

  describe(): string {
    return 'in-process';
  }

  publish(event: FederationEvent): void {
    for (const h of this.handlers) {
      try {
        h(event);
      } catch {
        // A faulty listener must not break the round that published.
      }
    }
  }

  subscribe(handler: (event: FederationEvent) => void): () => void {
    this.handlers.add(handler);
    return () => this.handlers.delete(handler);
  }

  async close(): Promise<void> {
    this.handlers.clear();
  }
}

export function eventSubject(federation: string, type: FederationEventType): string {
  return `medfl.${federation}.${type}`;
}
