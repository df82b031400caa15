/**
 * The round features (round-feature.ts) as the engine calls them: in list order, with the error handling each hook
 * has (a notification that throws is logged and the rounds go on; beforeCommit throws into the close).
 */
import type { TaskSettings } from '../../shared/protocol/task.ts';
import type { Logger } from '../../shared/util/log.ts';
import type { RoundRow } from '../store/store.ts';
import type { Stage } from './pretraining-stage.ts';
import type { CloseContribution, NewVersion, RoundFeature, RoundInput, RoundInputControl, RoundView } from './round-feature.ts';

/** What every feature added to a close, merged, and each feature's own part (handed back to it in onRoundClosed). */
export interface CloseContributions {
  added: Required<CloseContribution>;
  each: (CloseContribution | undefined)[];
}

export class FeatureHooks {
  constructor(
    readonly list: readonly RoundFeature[],
    private readonly log: Logger,
  ) {}

  /** The feature of class `kind`, if it runs (for a service that talks to it, e.g. secure aggregation's). */
  find<F extends RoundFeature>(kind: abstract new (...args: never[]) => F): F | undefined {
    return this.list.find((f): f is F => f instanceof kind);
  }

  start(): void {
    for (const f of this.list) f.start?.();
  }

  reload(): void {
    for (const f of this.list) f.reload?.();
  }

  onRoundOpening(round: number, stage: Stage): void {
    for (const f of this.list) f.onRoundOpening?.(round, stage);
  }

  /** Calls a notification hook of every feature; one that throws is logged and the others still run. */
  notify(hook: string, call: (f: RoundFeature) => void): void {
    for (const f of this.list) {
      try {
        call(f);
      } catch (e) {
        this.log.error({ feature: f.name, hook, err: (e as Error).message }, 'a round feature failed; the round goes on');
      }
    }
  }

  /** What the features add to a task's settings, merged in list order. */
  taskSettings(baseModelHash: string, stage: Stage): Partial<TaskSettings> {
    const added: Partial<TaskSettings> = {};
    for (const f of this.list) Object.assign(added, f.taskSettings?.(baseModelHash, stage));
    return added;
  }

  /** The first feature that collects the round's input instead of uploads (round-feature.ts collectInput), if any. */
  inputCollector(view: RoundView, control: RoundInputControl): { feature: string; input: RoundInput } | undefined {
    for (const f of this.list) {
      const input = f.collectInput?.(view, control);
      if (input) return { feature: f.name, input };
    }
    return undefined;
  }

  /** The first reason a feature gives not to resume the round `row` found open at start-up, and whose it is. */
  resumeRefusal(row: RoundRow): { feature: string; note: string } | undefined {
    for (const f of this.list) {
      const note = f.resumeRefusal?.(row);
      if (note !== undefined) return { feature: f.name, note };
    }
    return undefined;
  }

  /** Every feature's part of a close (a throw fails the close, which is retried). */
  beforeCommit(view: RoundView, version: NewVersion): CloseContributions {
    const each = this.list.map((f) => f.beforeCommit?.(view, version));
    const added: Required<CloseContribution> = { meta: {}, closedFields: {}, logFields: {}, events: [] };
    for (const c of each) {
      Object.assign(added.meta, c?.meta);
      Object.assign(added.closedFields, c?.closedFields);
      Object.assign(added.logFields, c?.logFields);
      added.events.push(...(c?.events ?? []));
    }
    return { added, each };
  }

  /** The close is committed: tells each feature, with its own contribution. A feature that throws is logged. */
  onRoundClosed(view: RoundView, version: NewVersion, contributions: CloseContributions): void {
    this.list.forEach((f, i) => {
      try {
        f.onRoundClosed?.(view, version, contributions.each[i]);
      } catch (e) {
        // Committed: the rounds go on; a feature that keeps files tries again at the next close or start.
        this.log.warn({ feature: f.name, hook: 'onRoundClosed', round: view.row.round, err: (e as Error).message }, 'a round feature failed after the round closed; the rounds go on');
      }
    });
  }
}
