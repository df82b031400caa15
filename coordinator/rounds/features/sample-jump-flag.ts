/**
 * A site whose declared sample count jumps far above its own recent history is flagged (warn + update.flagged):
 * the count is what FedAvg weighs by and nobody can check it. maxWeightShare bounds the effect; this tells the admin.
 */
import { median } from '../../aggregation/validate.ts';
import type { UpdateRow } from '../../store/store.ts';
import type { RoundFeature, RoundFeatureContext } from '../round-feature.ts';

export class SampleJumpFlag implements RoundFeature {
  readonly name = 'sample-jump-flag';

  constructor(private readonly c: RoundFeatureContext) {}

  onUpdateAccepted(row: UpdateRow): void {
    const history = this.c.store.recentSampleCounts(row.site, row.round);
    if (history.length === 0) return;
    const usual = median(history);
    const factor = this.c.plan.aggregation.validation.samplesJumpFactor;
    if (row.numSamples <= factor * usual) return;
    const reason = `declared ${row.numSamples} training samples, more than ${factor} × its median ${usual} over its last ${history.length} accepted update(s) (aggregation.validation.samplesJumpFactor)`;
    this.c.bus.publish(this.c.event('update.flagged', { round: row.round, site: row.site, samples: row.numSamples, previousMedian: usual, reason }));
    this.c.log.warn({ round: row.round, site: row.site, samples: row.numSamples, previousMedian: usual }, `update flagged: site ${reason}`);
  }
}
