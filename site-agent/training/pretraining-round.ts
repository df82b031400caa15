/**
 * One self-supervised pretraining round at a site (plan.pretraining, docs/pretraining.md): the global shared
 * encoder tensors under the site's own restoration decoder, trained on patches of every scan the site holds —
 * training, validation and unlabelled alike, labels never used — to restore Models Genesis-corrupted copies.
 *
 * What stays home: the decoder and every tensor the plan keeps local, in a file of their own (keyed apart from the
 * fine-tuning head's, so the two never mix), with their Adam moments. What leaves: exactly the task's shared
 * tensors. A shared tensor that is not part of the encoder (a plan that also shares heads) is sent back as it came:
 * pretraining does not train the fine-tuning head, and the decoder's tensors never take a shared name's place.
 */
import { existsSync, readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import type { Med3dArchitecture } from '../../shared/model/med3d.ts';
import { merge, pick } from '../../shared/model/sharing.ts';
import type { Trainer } from '../../shared/model/types.ts';
import { DEFAULT_OPTIMIZER, optimizerStateProblem, type OptimizerState } from '../../shared/model/optim.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { checkAgainstSpecs, findNonFinite, makeBundle, type TensorBundle } from '../../shared/tensors/bundle.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { writeFileAtomic } from '../../shared/util/fs-atomic.ts';
import type { Logger } from '../../shared/util/log.ts';
import { augmentOptions, DataSettingsSchema } from '../data/settings.ts';
import { patchToVolumeCase, type SiteData } from '../data/site-data.ts';
import { decodeOptimizerState, encodeOptimizerState } from './optimizer-state-file.ts';
import type { LocalRoundResult } from './local-training.ts';

export type PretrainingTask = NonNullable<TaskSettings['pretraining']>;

export interface PretrainingRoundInput {
  /** The restoration model of the plan's encoder (restorationArchitecture). */
  readonly arch: Med3dArchitecture;
  readonly trainer: Trainer;
  readonly settings: TaskSettings;
  readonly pretraining: PretrainingTask;
  readonly data: SiteData;
  /** The global model of the round (safetensors of the shared tensors). */
  readonly globalBytes: Buffer;
  readonly round: number;
  /** Seed of this round's batches and corruptions. */
  readonly seed: number;
  /** Seed of the site's fresh decoder (its first pretraining round). */
  readonly initSeed: number;
  readonly localDir: string;
  /** The site's key of the plan's model and sharing (as the fine-tuning head's file uses). */
  readonly fileKey: string;
  readonly log: Logger;
  readonly onProgress?: (fraction: number) => void;
}

/** The site's restoration decoder (and kept-local encoder tensors) of pretraining: never the fine-tuning head's file. */
export function restorationLocalPath(localDir: string, arch: Med3dArchitecture, fileKey: string): string {
  return join(localDir, `${arch.id}-restoration-${fileKey}.safetensors`);
}

export async function pretrainingRound(o: PretrainingRoundInput): Promise<LocalRoundResult> {
  const { arch, settings, pretraining, data, log } = o;
  const encoderNames = new Set(arch.params().filter((p) => p.part === 'encoder').map((p) => p.name));
  const sharedEncoder = settings.sharedTensors.filter((n) => encoderNames.has(n));
  const sharedSet = new Set(sharedEncoder);
  const global = decodeSafetensors(o.globalBytes).bundle;
  const sharedSpecs = arch.params().filter((p) => sharedSet.has(p.name));
  const problem = checkAgainstSpecs(pick(global, sharedSpecs), sharedSpecs) ?? findNonFinite(global);
  if (problem) throw new Error(`the global model does not fit this site's encoder: ${problem}`);

  // Every scan at the site; the test set is never in a site's folder.
  const refs = [...data.train, ...data.val, ...data.unlabelled].filter((r) => !data.isBad(r));
  if (refs.length === 0) throw new Error(`no usable scan in the site's data folder for pretraining (${data.skipped().length} skipped); run \`medfl site check-data\``);
  const augment = augmentOptions(settings.data ?? DataSettingsSchema.parse({}));
  const source = {
    cases: refs.length,
    sample: async (count: number, rng: () => number) =>
      // No foreground oversampling (it would need the labels); the patch's label, if any, is dropped here.
      (await data.sampleBatch(refs, count, rng, { augment, foregroundFraction: 0 })).map((p, i) => {
        const { label: _label, classLabel: _classLabel, ...image } = patchToVolumeCase(p, `pretrain-${i}`);
        return image;
      }),
  };

  const localSpecs = arch.params().filter((p) => !sharedSet.has(p.name));
  const path = restorationLocalPath(o.localDir, arch, o.fileKey);
  const local = loadLocal(path, localSpecs);
  const start = merge(merge(arch.init(o.initSeed), local), pick(global, sharedEncoder.map((name) => ({ name }))));
  const statePath = join(o.localDir, 'optimizer-state', basename(path));
  const optimizerState = local.size > 0 ? loadState(statePath, arch, sharedSet, log) : undefined;
  const batchSize = pretraining.batchSize ?? settings.local.batchSize;
  const t0 = performance.now();
  log.info({ round: o.round, stageRound: pretraining.round, steps: pretraining.steps, images: refs.length, engine: o.trainer.engine }, 'pretraining (restoration) started');
  const result = await o.trainer.train({
    weights: start,
    cases: [],
    source,
    steps: pretraining.steps,
    batchSize,
    learningRate: pretraining.learningRate,
    seed: o.seed,
    optimizer: DEFAULT_OPTIMIZER,
    objective: 'restore',
    restoration: pretraining.transforms,
    ...(optimizerState ? { optimizerState } : {}),
    onStep: (s) => o.onProgress?.((s + 1) / pretraining.steps),
  });
  const seconds = (performance.now() - t0) / 1000;

  writeFileAtomic(path, encodeSafetensors(pick(result.weights, localSpecs)), 0o600);
  if (result.optimizerState) {
    const own = new Map([...result.optimizerState].filter(([name]) => !sharedSet.has(name)));
    if (own.size > 0) writeFileAtomic(statePath, encodeOptimizerState(own, DEFAULT_OPTIMIZER.kind), 0o600);
  }
  // Exactly the task's shared tensors: the trained encoder's, and untouched what pretraining does not train.
  const update = makeBundle(settings.sharedTensors.map((name) => {
    const t = sharedSet.has(name) ? result.weights.get(name) : global.get(name);
    if (!t) throw new Error(`shared tensor ${name} is missing from the global model`);
    return t;
  }));
  const metrics: Record<string, number> = {
    pretraining_round: pretraining.round,
    restoration_loss: result.loss,
    restoration_loss_first: result.firstLoss,
    num_pretrain_images: refs.length,
    train_seconds: seconds,
  };
  log.info({ round: o.round, stageRound: pretraining.round, loss: round4(result.loss), firstLoss: round4(result.firstLoss), seconds: round4(seconds) }, 'pretraining (restoration) done');
  return { update: encodeSafetensors(update, { round: String(o.round) }), numSamples: result.samples, metrics };
}

function loadLocal(path: string, specs: ReturnType<Med3dArchitecture['params']>): TensorBundle {
  if (!existsSync(path)) return new Map();
  const bundle = decodeSafetensors(readFileSync(path)).bundle;
  const problem = checkAgainstSpecs(bundle, specs) ?? findNonFinite(bundle);
  if (problem) throw new Error(`the site's restoration decoder (${path}) is unusable: ${problem}. Move the file away to start the decoder afresh.`);
  return bundle;
}

/** The decoder's Adam moments from the last pretraining round, or undefined when they do not fit (then they start afresh). */
function loadState(path: string, arch: Med3dArchitecture, shared: ReadonlySet<string>, log: Logger): OptimizerState | undefined {
  if (!existsSync(path)) return undefined;
  let problem: string | undefined;
  try {
    const saved = decodeOptimizerState(readFileSync(path));
    const sharedName = [...saved.state.keys()].find((n) => shared.has(n));
    problem = saved.kind !== DEFAULT_OPTIMIZER.kind ? `it is ${saved.kind} state` : sharedName ? `it holds shared parameter ${sharedName}` : optimizerStateProblem(saved.state, DEFAULT_OPTIMIZER.kind, arch.params());
    if (!problem) return saved.state;
  } catch (e) {
    problem = (e as Error).message;
  }
  log.warn({ problem }, "the restoration decoder's saved optimiser state does not fit: its moments start afresh");
  return undefined;
}

const round4 = (x: number) => Math.round(x * 1e4) / 1e4;
