/**
 * The plan's pretraining stage (plan.pretraining): which sites took part, and, once every pretraining round has
 * closed, the encoder file with its provenance (written once; fine-tuning simply continues from that aggregate,
 * the current model). The stage itself (which round is which) is the engine's: it shapes every task.
 */
import { dirname, join } from 'node:path';
import { assembleEncoder, writePretrainedEncoder } from '../../../shared/model/pretrained-encoder-file.ts';
import type { Med3dArchitecture } from '../../../shared/model/med3d.ts';
import { addPretrainingSites, PRETRAINED_ENCODER_KEY, PRETRAINING_SITES_KEY, pretrainingRounds } from '../pretraining-stage.ts';
import type { CloseContribution, RoundFeature, RoundFeatureContext, RoundView } from '../round-feature.ts';

export class PretrainedEncoder implements RoundFeature {
  readonly name = 'pretrained-encoder';

  constructor(
    private readonly c: RoundFeatureContext,
    /** Where the encoder file is written (default: `pretrained/` beside the models folder). */
    private readonly dir: string | undefined,
  ) {}

  /** Pretraining ended but the coordinator stopped before writing its encoder file: write it now. */
  start(): void {
    this.ensure();
  }

  beforeCommit(round: RoundView): CloseContribution | undefined {
    if (round.stage.kind !== 'pretraining') return undefined;
    return { meta: { [PRETRAINING_SITES_KEY]: addPretrainingSites(this.c.store.getMeta(PRETRAINING_SITES_KEY), round.reported) } };
  }

  onRoundClosed(round: RoundView): void {
    if (round.stage.kind !== 'pretraining') return;
    try {
      this.ensure();
    } catch (e) {
      // The rounds go on from the aggregate; the next start of the coordinator tries the file again.
      this.c.log.error({ err: (e as Error).message }, 'writing the pretrained encoder file failed');
    }
  }

  /**
   * Once the plan's pretraining rounds have all closed: writes the encoder file (every encoder tensor: the last
   * pretraining aggregate's shared tensors, scratch for what the plan keeps at the sites) with its provenance, once.
   */
  private ensure(): void {
    const { store, plan, models, architecture, log } = this.c;
    const p = pretrainingRounds(plan);
    if (p === 0 || store.getMeta(PRETRAINED_ENCODER_KEY)) return;
    const closed = store.listRounds().filter((r) => r.state === 'closed').sort((a, b) => a.round - b.round);
    if (closed.length < p || !closed[p - 1].resultModelHash) return;
    const last = closed[p - 1];
    const source = last.resultModelHash!;
    const arch = architecture as Med3dArchitecture;
    const { bundle, notPretrained } = assembleEncoder(arch, models.load(source), arch.init(plan.model.seed));
    const sites = JSON.parse(store.getMeta(PRETRAINING_SITES_KEY) ?? '[]') as string[];
    const dir = this.dir ?? join(dirname(models.dir), 'pretrained');
    const { path, provenance } = writePretrainedEncoder(dir, arch, bundle, {
      objective: plan.pretraining.objective,
      sites,
      rounds: p,
      stepsPerRound: plan.pretraining.steps,
      learningRate: plan.pretraining.learningRate,
      transforms: plan.pretraining.transforms,
      federation: this.c.federationId,
      sourceModelHash: source,
      createdAt: new Date().toISOString(),
      notPretrained,
    });
    store.setMeta(PRETRAINED_ENCODER_KEY, JSON.stringify({ path, provenance }));
    log.info({ path, round: last.round, sites, rounds: p, tensors: provenance.tensorsSha256.slice(0, 12), notPretrained: notPretrained.length }, 'pretraining finished: encoder file written; fine-tuning continues from it');
  }
}
