/**
 * The round features every coordinator runs, in the order their hooks are called (round-feature.ts). A new
 * feature is a module here and a line in this list; the round engine needs no edit.
 */
import type { RoundFeature, RoundFeatureContext } from '../round-feature.ts';
import { CompressedModelFiles } from './compressed-model-files.ts';
import { DpAccounting } from './dp-accounting.ts';
import { PretrainedEncoder } from './pretrained-encoder.ts';
import { Retention } from './retention.ts';
import { SampleJumpFlag } from './sample-jump-flag.ts';
import { SecureAggregation } from './secure-aggregation.ts';
import { TeacherPromotion } from './teacher-promotion.ts';

/** The standard features' options; the round engine's options include them and pass them on unread. */
export interface StandardFeatureOptions {
  /** Where accepted updates are stored (round-N/…), for plan.retention to prune after a round closes. */
  updatesDir?: string;
  /** Where secure-aggregation rounds keep the masked vectors they received (round-N/masked-SITE.u32), for audit and plan.retention. */
  maskedDir?: string;
  /** Where the encoder file of the plan's pretraining stage is written (default: `pretrained/` beside the models folder). */
  pretrainedDir?: string;
}

export function standardRoundFeatures(c: RoundFeatureContext, o: StandardFeatureOptions): RoundFeature[] {
  // Task settings keep this order (dp, compression, model file, teacher): it is the order of their JSON keys.
  // Secure aggregation last: its phase timeline closes the round.closed event's fields.
  return [
    new SampleJumpFlag(c),
    new DpAccounting(c),
    new CompressedModelFiles(c),
    new TeacherPromotion(c),
    new PretrainedEncoder(c, o.pretrainedDir),
    new Retention(c, [o.updatesDir, o.maskedDir]),
    new SecureAggregation(c, o.maskedDir),
  ];
}
