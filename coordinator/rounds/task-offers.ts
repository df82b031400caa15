/**
 * Which site gets which task: a round's TRAIN task shaped for what each site announced (or withheld from a site that
 * lacks a feature the settings need), sent to the selected sites when the round opens, when one reconnects, and
 * again to a selected site that reports idle without it (REOFFER_MS apart).
 */
import { randomUUID } from 'node:crypto';
import type { Plan } from '../../shared/plan/schema.ts';
import { settingsForSite } from '../../shared/protocol/compatibility.ts';
import type { TaskManifest, TaskSettings } from '../../shared/protocol/task.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { RoundRow } from '../store/store.ts';
import type { FeatureHooks } from './feature-hooks.ts';
import type { OpenRound } from './open-round.ts';
import { stageSettings, type Stage } from './pretraining-stage.ts';
import type { RoundEvents } from './round-events.ts';
import { capabilitiesOf, type SiteConnections, type TaskMessage, type TaskSink } from './site-connections.ts';

/**
 * A selected site that heartbeats "idle, no task" while the round waits for it is sent its task again, at most this
 * often: it gave the task up (e.g. its model download kept failing until it stopped trying) and would otherwise sit
 * idle until the deadline, since tasks are otherwise sent only when a round opens and when a site reconnects.
 */
export const REOFFER_MS = 30_000;

/** A TRAIN task of round `row` for `site` with its settings as shaped for the site. */
export function trainManifest(row: RoundRow, site: string, settings: TaskSettings, modelSize: number): TaskManifest {
  return {
    // Stable per round and site: a re-sent task is the same task.
    taskId: `r${row.round}-${site}`,
    kind: 'TRAIN',
    round: row.round,
    modelHash: row.baseModelHash,
    modelSize,
    deadlineUnixMs: row.deadlineAt,
    settingsJson: JSON.stringify(settings),
  };
}

/** The task that tells a site the federation is over (sent to every site connected then or later). */
export function finishedManifest(lastRound: number, modelHash: string, modelSize: number): TaskManifest {
  return { taskId: `finished-${randomUUID()}`, kind: 'FINISHED', round: lastRound, modelHash, modelSize, deadlineUnixMs: 0, settingsJson: '{}' };
}

export interface TaskOffersOptions {
  plan: Plan;
  federationId: string;
  sharedNames: string[];
  features: FeatureHooks;
  connections: SiteConnections;
  events: RoundEvents;
  log: Logger;
  /** Makes and signs the TRAIN task (the engine's, see RoundEngine.trainTask). */
  trainTask(row: RoundRow, site: string, settings: TaskSettings): TaskMessage;
  /** The task was withheld from `site`: the round should not wait for it. */
  withheld(site: string, round: number): void;
  reofferMs: number;
}

export class TaskOffers {
  /** When each site was last sent the open round's task (round and time): re-offers to idle sites are spaced by it. */
  private readonly offered = new Map<string, { round: number; at: number }>();

  constructor(private readonly o: TaskOffersOptions) {}

  /** A round's task settings: the plan's, the stage's, then what each feature adds. */
  settings(baseModelHash: string, stage: Stage): TaskSettings {
    const { plan } = this.o;
    const settings: TaskSettings = {
      federation: this.o.federationId,
      // The coordinator's file paths (pretrained, source2d) stay here: sites need the layout and seed only.
      model: { ...plan.model, pretrained: undefined, source2d: undefined },
      local: plan.local,
      share: plan.share,
      sharedTensors: this.o.sharedNames,
      data: plan.data,
      totalRounds: plan.rounds,
      ...stageSettings(plan, stage),
    };
    return Object.assign(settings, this.o.features.taskSettings(baseModelHash, stage));
  }

  /** Sends the round's task to each selected, connected site that has not reported. Throws what sending threw. */
  sendAll(open: OpenRound): void {
    for (const s of open.row.selected) {
      const sink = open.reported.has(s) ? undefined : this.o.connections.get(s);
      if (sink) this.offer(open, s, sink);
    }
  }

  /** Sends `site` the round's task (shaped for it), noting when; false when the task was withheld. */
  offer(open: OpenRound, site: string, sink: TaskSink): boolean {
    const task = this.taskFor(open, site, sink);
    if (!task) return false;
    sink.send(task);
    this.offered.set(site, { round: open.row.round, at: Date.now() });
    return true;
  }

  /**
   * `site` heartbeats idle with no task: if it is selected for `open` and has neither reported nor declined, and was
   * not offered the task in the last REOFFER_MS, it is sent the task again. Never throws (only a reminder: the next
   * idle heartbeat tries again).
   */
  reofferToIdle(open: OpenRound, site: string): void {
    if (!open.row.selected.includes(site) || open.reported.has(site) || open.declined?.has(site)) return;
    const sink = this.o.connections.get(site);
    const last = this.offered.get(site);
    if (!sink || (last?.round === open.row.round && Date.now() - last.at < this.o.reofferMs)) return;
    try {
      if (this.offer(open, site, sink)) this.o.log.info({ round: open.row.round, site }, 'site reports idle without its task: offered it again');
    } catch (e) {
      this.o.log.warn({ round: open.row.round, site, err: (e as Error).message }, 'could not offer the task again to an idle site');
    }
  }

  /**
   * The round's task for `site` shaped for what its sink announced, or undefined when the task needs a feature the
   * site lacks: then it is not sent, the site is not waited for, and a task.withheld event names site and features.
   */
  private taskFor(open: OpenRound, site: string, sink: TaskSink): TaskMessage | undefined {
    const caps = capabilitiesOf(sink);
    const shaped = settingsForSite({ ...this.settings(open.row.baseModelHash, open.stage), ...open.collector?.input.siteSettings(site) }, caps);
    if (shaped.ok) return this.o.trainTask(open.row, site, shaped.settings);
    const { round } = open.row;
    if (!open.declined?.has(site)) {
      this.o.events.emit('task.withheld', { round, site, missing: shaped.missing, protocolVersion: caps.protocolVersion });
      this.o.log.warn({ round, site, missing: shaped.missing, protocolVersion: caps.protocolVersion }, `task withheld: site ${site} (protocol version ${caps.protocolVersion}) lacks feature(s) ${shaped.missing.join(', ')} this round's settings need; upgrade it`);
    }
    // Not waited for, like a site that declined (the round may close now if everyone else has reported).
    this.o.withheld(site, round);
    return undefined;
  }
}
