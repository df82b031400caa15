/** The engine's federation events: each with its stable id, so the same fact written twice is one outbox row. */
import type { EventBus, FederationEvent, FederationEventType } from '../../shared/events/bus.ts';
import { eventId } from '../events/outbox.ts';

export class RoundEvents {
  constructor(
    private readonly federationId: string,
    private readonly bus: EventBus,
  ) {}

  /** An event with its stable id (events/outbox.ts eventId), not yet published. */
  event(type: FederationEventType, fields: Record<string, unknown>): FederationEvent {
    return { id: eventId(this.federationId, type, fields), type, federation: this.federationId, at: new Date().toISOString(), ...fields };
  }

  /** Publishes an event made earlier (committed to the outbox first where it must not be lost). */
  publish(event: FederationEvent): void {
    this.bus.publish(event);
  }

  /** Makes and publishes an event that needs no outbox row. */
  emit(type: FederationEventType, fields: Record<string, unknown>): void {
    this.bus.publish(this.event(type, fields));
  }
}
