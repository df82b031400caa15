/**
 * A round engine on a store and model folder in `dir`, without gRPC: enrolled sites are in-memory task sinks, so
 * tests drive the round lifecycle directly (connect, fold, deadline, stop and start again on the same store).
 */
import { join } from 'node:path';
import { pino } from 'pino';
import { CoordinatorStore } from '../../coordinator/store/store.ts';
import { ModelFiles } from '../../coordinator/models/model-store.ts';
import { RoundEngine, type RoundEngineOptions, type TaskMessage } from '../../coordinator/rounds/round-engine.ts';
import { strategyFromPlan } from '../../coordinator/aggregation/index.ts';
import { signedTask } from '../../coordinator/rounds/task-signer.ts';
import { InProcessBus, type FederationEvent } from '../../shared/events/bus.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import { architectureFor } from '../../shared/model/registry.ts';

export interface BareEngine {
  store: CoordinatorStore;
  models: ModelFiles;
  engine: RoundEngine;
  /** Every event published, in order. */
  events: FederationEvent[];
  /** Every task sent to any site, in order. */
  tasks: TaskMessage[];
  /** Enrols `sites` in the store (once per store). */
  enrol(sites: readonly string[]): void;
  /** Connects `sites` to the engine; their tasks land in `tasks`. */
  connect(sites: readonly string[]): void;
  /** Stops the engine and closes the store. */
  close(): void;
}

export function bareEngine(dir: string, plan: Plan, options: Partial<RoundEngineOptions> = {}): BareEngine {
  const store = new CoordinatorStore(join(dir, 'state.db'));
  const models = new ModelFiles(join(dir, 'models'));
  const events: FederationEvent[] = [];
  const bus = new InProcessBus();
  bus.subscribe((e) => events.push(e));
  const engine = new RoundEngine({
    store,
    models,
    plan,
    architecture: architectureFor(plan.model),
    strategy: strategyFromPlan(plan),
    bus,
    federationId: 'fed-bare',
    signTask: (m) => signedTask(m, () => Buffer.alloc(64)),
    log: pino({ level: 'silent' }),
    ...options,
  });
  const tasks: TaskMessage[] = [];
  return {
    store,
    models,
    engine,
    events,
    tasks,
    enrol(sites) {
      for (const s of sites) {
        const tokenHash = s.padEnd(64, 'h');
        store.inviteSite(s, tokenHash, Date.now() + 60_000);
        if (!store.enrolSite(s, tokenHash, Buffer.alloc(32, 7)).ok) throw new Error(`could not enrol ${s}`);
      }
    },
    connect(sites) {
      for (const s of sites) engine.siteConnected(s, { send: (t) => tasks.push(t) });
    },
    close() {
      engine.stop();
      store.close();
    },
  };
}
