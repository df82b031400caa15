/** A selected site that reports idle without its task is offered it again, but not more often than reofferMs. */
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import type { RoundAggregator } from '../../../coordinator/aggregation/strategy.ts';
import { FeatureHooks } from '../../../coordinator/rounds/feature-hooks.ts';
import type { OpenRound } from '../../../coordinator/rounds/open-round.ts';
import { RoundEvents } from '../../../coordinator/rounds/round-events.ts';
import { SiteConnections, type TaskMessage } from '../../../coordinator/rounds/site-connections.ts';
import { TaskOffers, trainManifest } from '../../../coordinator/rounds/task-offers.ts';
import { signedTask } from '../../../coordinator/rounds/task-signer.ts';
import { InProcessBus } from '../../../shared/events/bus.ts';
import { parsePlan } from '../../../shared/plan/load.ts';

const plan = parsePlan(['model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: 4, seed: 3 }', 'rounds: 2', 'minSites: 1', ''].join('\n'), 'plan.yaml');
const log = pino({ level: 'silent' });

function setup(reofferMs: number) {
  const connections = new SiteConnections();
  const sent: Record<string, TaskMessage[]> = { a: [], b: [] };
  for (const site of ['a', 'b']) connections.connect(site, { send: (t) => sent[site].push(t) });
  const offers = new TaskOffers({
    plan,
    federationId: 'fed-offers',
    sharedNames: ['w'],
    features: new FeatureHooks([], log),
    connections,
    events: new RoundEvents('fed-offers', new InProcessBus()),
    log,
    trainTask: (row, site, settings) => signedTask(trainManifest(row, site, settings, 123), () => Buffer.alloc(64)),
    withheld: () => undefined,
    reofferMs,
  });
  const open: OpenRound = {
    row: { round: 1, state: 'open', baseModelHash: 'b'.repeat(64), selected: ['a', 'b'], openedAt: 0, deadlineAt: 1, closedAt: null, resultModelHash: null, note: null },
    aggregator: {} as RoundAggregator,
    reported: new Set(),
    closing: false,
    stage: { kind: 'fine-tuning', index: 1 },
  };
  return { offers, open, sent };
}

describe('TaskOffers', () => {
  it('sends the same signed task to each selected site, and offers it again to an idle one only after reofferMs', async () => {
    const { offers, open, sent } = setup(40);
    offers.sendAll(open);
    expect(sent.a.map((t) => t.taskId)).toEqual(['r1-a']);
    expect(JSON.parse(sent.a[0].settingsJson).sharedTensors).toEqual(['w']);
    offers.reofferToIdle(open, 'a');
    expect(sent.a).toHaveLength(1);
    await new Promise((r) => setTimeout(r, 60));
    offers.reofferToIdle(open, 'a');
    expect(sent.a).toHaveLength(2);
    expect(sent.a[1]).toEqual(sent.a[0]);
  });

  it('does not offer the task again to a site that reported or declined', async () => {
    const { offers, open, sent } = setup(0);
    open.reported.add('a');
    open.declined = new Set(['b']);
    offers.reofferToIdle(open, 'a');
    offers.reofferToIdle(open, 'b');
    expect(sent.a).toHaveLength(0);
    expect(sent.b).toHaveLength(0);
  });
});
