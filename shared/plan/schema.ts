/**
 * The federation plan: what a coordinator runs. Validated at the edge (zod); everything inside uses the typed `Plan`.
 */
import { z } from 'zod';
import { INIT_SPEC_FORMS, isInitSpec } from '../model/transfer-init.ts';
import { OptimizerSpecSchema } from '../model/optim.ts';
import { MED3D_DEFAULT_NORM_GROUPS, MED3D_MAX_IN_CHANNELS } from '../model/med3d.ts';
import { MODEL_IDS, modelDefinition } from '../model/registry.ts';
import { NORM_KINDS } from '../model/layers/norm-layers.ts';
import { LrScheduleSchema } from '../model/lr-schedule.ts';
import { DataSettingsSchema } from './data-settings.ts';
import { RestorationTransformsSchema } from '../model/genesis-corruption.ts';
import { InferenceSettingsSchema } from '../model/sliding-window.ts';

const positiveInt = z.number().int().positive();

/** Default aggregation.validation.maxNormFactor: an honest site's step is rarely 3× the median, never 10×. */
export const DEFAULT_MAX_NORM_FACTOR = 10;

export const ModelPartSchema = z.enum(['encoder', 'head']);
export const LayerTypeSchema = z.enum(['conv', 'norm', 'dense', 'other']);

/**
 * Noisy student, federated: every `promoteEvery` rounds the aggregated model becomes the teacher; each site's
 * un-noised teacher (with that site's own head) labels its unlabelled pool, and the noised student trains on
 * labelled + pseudo-labelled patches. Travels to sites in every task.
 */
export const TeacherStudentSchema = z
  .object({
    enabled: z.boolean().default(false),
    /** Rounds between promotions of the aggregated student to teacher (the first teacher after this many rounds). */
    promoteEvery: positiveInt.default(2),
    /** Pseudo-labelled patches per labelled patch: a student batch is local.batchSize labelled + round(ratio × batchSize) pseudo-labelled. */
    ratio: z.number().min(0).max(16).default(1),
    /**
     * Voxels whose teacher max-probability is below this are masked out of the pseudo-label loss. Noisy Student's
     * 0.3 is for 1000 image classes; with 2–3 voxel classes every max-probability is ≥ 1/C, so the default is 0.9.
     */
    confidence: z.number().min(0).max(1).default(0.9),
    /**
     * Calibrate the confidence threshold per generation on the site's validation cases instead: the lowest threshold
     * at which the teacher's confident foreground voxels are right in at least this share (per class). 0 = use
     * `confidence` as given (as does leaving it out). A site without validation cases gets no teacher anyway (the gate
     * fails closed).
     */
    confidenceTarget: z.number().min(0).max(1).optional(),
    /** soft = teacher softmax as targets; hard = one-hot argmax. */
    labels: z.enum(['soft', 'hard']).default('soft'),
    /** Teacher test-time augmentation: mean of the probabilities over the 8 axis-flip combinations. */
    flipTTA: z.boolean().default(false),
    /** Class-balanced sampling of pseudo-labelled patches: each is centred on a confidently labelled voxel of a uniformly drawn class. */
    classBalance: z.boolean().default(true),
    /**
     * Teacher quality gate, decided at each site: a site whose held-back validation cases give the teacher (with the
     * site's head) a mean Dice below this trains on labelled cases only for that generation (a teacher that misses
     * the foreground would otherwise teach the student to miss it too). 0 = always use the teacher.
     */
    minTeacherDice: z.number().min(0).max(1).default(0.5),
    /**
     * Each round a site uses pseudo-labels only while its teacher's validation Dice is at least the received model's
     * (global shared tensors with the site's own head) minus this margin; else it trains on labelled cases alone that
     * round. 1 lets any measured teacher through; 0 lets a teacher equal to the model through; below 0 the teacher
     * must lead the model by that much. The default (−0.005) keeps the round right after a promotion, whose teacher
     * is the received model itself, free of pseudo-labels: on the benchmark that self-training round cost up to
     * 0.015 Dice (docs/teacher-student.md).
     */
    modelMargin: z.number().min(-1).max(1).default(-0.005),
    /**
     * Pseudo-label sanity: an unlabelled case whose predicted foreground share is more than this factor above or
     * below the share in the site's labelled training cases is not used (0 = no check).
     */
    maxForegroundFactor: z.number().min(0).default(4),
    /** Student noise: dropout before the output layer (Noisy Student: 0.5 on the last layer). */
    dropout: z.number().min(0).lt(1).default(0.5),
    /** Student noise: stronger augmentation (brightness, noise, shift at higher probabilities) on every patch. */
    strongAugment: z.boolean().default(true),
  })
  .strict();

export type TeacherStudentSettings = z.infer<typeof TeacherStudentSchema>;

/**
 * Federated self-supervised pretraining of the shared encoder (docs/pretraining.md): `rounds` rounds before the
 * fine-tuning rounds, in which every site trains encoder + its own restoration decoder on all its scans (labels
 * unused) and sends back only the plan's shared tensors. Med3D only; off by default.
 */
export const PretrainingSchema = z
  .object({
    enabled: z.boolean().default(false),
    /** Pretraining rounds, run before the plan's `rounds` fine-tuning rounds. */
    rounds: positiveInt.default(4),
    /** Local steps per pretraining round at every site. */
    steps: positiveInt.default(50),
    /** Adam learning rate of the restoration objective (constant; the plan's schedule is for fine-tuning). 0.003 fell faster than 0.001 on the benchmark (docs/pretraining.md). */
    learningRate: z.number().positive().default(0.003),
    /** Patches per step; absent = local.batchSize. */
    batchSize: positiveInt.optional(),
    /** The pretext task: Models Genesis-style restoration of corrupted patches. */
    objective: z.literal('restoration').default('restoration'),
    /** Probabilities of the corruptions (shared/model/genesis-corruption.ts). */
    transforms: RestorationTransformsSchema.prefault({}),
  })
  .strict();

export type PretrainingSettings = z.infer<typeof PretrainingSchema>;

export const PlanSchema = z
  .object({
    /** Human name of the federation; the JWT audience is derived from the coordinator's id, not from this. */
    name: z.string().min(1).default('medfl-federation'),
    model: z
      .object({
        /** A registered architecture (shared/model/registry.ts): tiny3d, the small demo net; med3d, MedicalNet's 3D ResNet encoder with a site head. */
        architecture: z.enum(MODEL_IDS).default('tiny3d'),
        patch: z.tuple([positiveInt, positiveInt, positiveInt]).default([24, 24, 24]),
        numClasses: z.number().int().min(2).default(2),
        /** tiny3d only: base channel count. */
        width: positiveInt.default(8),
        /** med3d only: ResNet depth (MedicalNet publishes 10, 18, 34, 50, 101). */
        depth: z.union([z.literal(10), z.literal(18), z.literal(34), z.literal(50), z.literal(101)]).default(10),
        /** med3d only: shortcut type of the projection blocks (MedicalNet: R10 B, R18/R34 A, R50/R101 B). */
        shortcut: z.enum(['A', 'B']).default('B'),
        /** med3d only: scales every width; 1 is MedicalNet itself, 0.25 trains on a CPU. */
        widthMultiplier: z.number().positive().max(16).default(0.25),
        /**
         * med3d only: the site head (segmentation: MedicalNet's conv_seg, ¼ resolution; unet: a light decoder over the
         * encoder's skips, full resolution; classification: pool, dropout, dense).
         */
        head: z.enum(['segmentation', 'unet', 'classification']).default('segmentation'),
        /** med3d segmentation/unet head channels (default 32 × widthMultiplier; unet at least 8). */
        headChannels: positiveInt.optional(),
        /** med3d only: norm layers of encoder and head: batch (MedicalNet's), group, or instance (no running statistics). */
        norm: z.enum(NORM_KINDS).default('batch'),
        /** med3d norm: group: groups per norm layer; must divide every normalised channel count. */
        normGroups: positiveInt.default(MED3D_DEFAULT_NORM_GROUPS),
        /** med3d classification head: dropout before the dense layer while training. */
        dropout: z.number().min(0).lt(1).default(0),
        /**
         * med3d only: input channels, one per MSD image file _0000…_000N (e.g. 4 for BrainTumour's FLAIR, T1w, T1gd,
         * T2w); every site's dataset.json must name that many. Absent = 1, and the field is then left out of the
         * settings sent to sites, so one-channel plans stay exactly what older sites accept.
         */
        inputChannels: z.number().int().min(1).max(MED3D_MAX_IN_CHANNELS).optional(),
        seed: z.number().int().default(1),
        /** How the initial global model is made: scratch | pretrained | partial:k | mean-var | inflate-2d:1xk | inflate-2d:i3d. */
        init: z.string().refine(isInitSpec, { message: `init must be one of ${INIT_SPEC_FORMS.join(', ')}` }).default('scratch'),
        /** Pretrained weights (MedFL safetensors, e.g. from `medfl model import`) for pretrained / partial:k / mean-var. */
        pretrained: z.string().optional(),
        /** A torchvision-layout 2D ResNet (safetensors) for inflate-2d:*. */
        source2d: z.string().optional(),
        /**
         * How sites score whole volumes (validation, test, pseudo-labels): whole (default) or sliding windows, with
         * Gaussian or uniform blending and optional flip TTA (shared/model/sliding-window.ts). Absent = whole.
         */
        inference: InferenceSettingsSchema.optional(),
      })
      .strict()
      .superRefine((m, ctx) => {
        // The architecture's own checks (its registered definition), so adding a model needs no edit here.
        for (const p of modelDefinition(m.architecture).modelProblems(m)) ctx.addIssue({ code: 'custom', path: [...p.path], message: p.message });
      })
      .prefault({}),
    rounds: positiveInt.default(3),
    /** Quorum: a round closes at its deadline only if at least this many sites reported. */
    minSites: positiveInt.default(2),
    /** Sites asked per round; 0 = every connected site. */
    sitesPerRound: z.number().int().min(0).default(0),
    /** Seconds a round may run before it closes on quorum (or is retried without it). */
    roundDeadlineSeconds: z.number().positive().default(300),
    /** Once a quorum is connected, seconds to wait for the other enrolled sites before a round starts without them. */
    gatherSeconds: z.number().min(0).default(5),
    /** Seconds to wait at round start for `minSites` sites to be connected. */
    waitForSitesSeconds: z.number().positive().default(600),
    /**
     * What the coordinator process does once every planned round has closed (sites are told either way): `exit` with
     * status 0 after `finishGraceSeconds`, or `idle` (keeps serving status, the dashboard and /metrics until stopped).
     */
    afterLastRound: z.enum(['exit', 'idle']).default('exit'),
    /** With afterLastRound exit: seconds to stay up first, so sites that are reconnecting hear the finish and a last scrape sees the final state. */
    finishGraceSeconds: z.number().min(0).max(86_400).default(60),
    local: z
      .object({
        steps: positiveInt.optional(),
        epochs: z.number().positive().optional(),
        batchSize: positiveInt.default(2),
        learningRate: z.number().positive().default(0.003),
        proximalMu: z.number().min(0).default(0),
        /** Optimiser, learning-rate scale per parameter group, frozen groups (default Adam, all trained). */
        optimizer: OptimizerSpecSchema.optional(),
        /** Learning-rate schedule over the whole federation (all rounds' local steps); absent = constant. */
        schedule: LrScheduleSchema.optional(),
        /**
         * Which optimiser moments a site keeps between rounds: `own` = only for the tensors that stay at the site
         * (heads, local norms), `all` = for the shared tensors too (they never leave the site; the next round's
         * Adam then continues instead of restarting from zero moments on the new global model).
         */
        keepMoments: z.enum(['own', 'all']).default('own'),
      })
      .strict()
      .prefault({})
      .refine((l) => !(l.steps !== undefined && l.epochs !== undefined), { message: 'give local.steps or local.epochs, not both' }),
    /** How every site prepares its scans: spacing, normalisation, patch sampling, augmentation (docs/data.md). */
    data: DataSettingsSchema.prefault({}),
    share: z
      .object({
        /** Model parts that travel; by default only the encoder, so heads stay at the site. */
        parts: z.array(ModelPartSchema).min(1).default(['encoder']),
        /** Layer types kept local even inside shared parts (e.g. ["norm"] for FedBN). */
        keepLocal: z.array(LayerTypeSchema).default([]),
      })
      .strict()
      .default({ parts: ['encoder'], keepLocal: [] }),
    /** How updates become the next model: a combine rule, an optional server optimiser, filters (docs/plan.md). */
    aggregation: z
      .object({
        /** fedavg = sample-weighted mean (streaming); median / trimmed-mean = coordinate-wise, unweighted (need all updates, spilled to disk). */
        strategy: z.enum(['fedavg', 'median', 'trimmed-mean']).default('fedavg'),
        /** β for trimmed-mean: the fraction dropped at each end, per coordinate; must exceed the Byzantine fraction. */
        trimFraction: z.number().min(0).lt(0.5).default(0.1),
        /** Applied to the combined delta (Reddi et al.): none = take it as is (plain FedAvg). */
        serverOptimizer: z
          .object({
            /** fedavgm = server momentum (β₁; η = 1 is FedAvg plus momentum); the others adapt per coordinate. */
            type: z.enum(['none', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad']).default('none'),
            /** η, the server learning rate (0.1 suits the adaptive ones; fedavgm wants about 1). */
            lr: z.number().positive().default(0.1),
            beta1: z.number().min(0).lt(1).default(0.9),
            beta2: z.number().min(0).lt(1).default(0.99),
            /** τ, the adaptivity (added to √v). */
            tau: z.number().positive().default(1e-3),
          })
          .strict()
          .prefault({}),
        /** Checks every update passes before it counts (names, dtypes, shapes and finiteness are always checked). */
        validation: z
          .object({
            /** Refuse an update whose delta (against the round's base model) has an L2 norm above this. */
            maxNorm: z.number().positive().optional(),
            /**
             * Refuse an update whose delta norm exceeds k × the median norm of recently accepted updates. On by default
             * (DEFAULT_MAX_NORM_FACTOR, except with secure aggregation, which cannot see single updates); 0 turns it off.
             */
            maxNormFactor: z.union([z.number().gt(1), z.literal(0)]).optional(),
            /** Refuse an update proposing any weight beyond ±maxValue (absolute: holds from the very first update). */
            maxValue: z.number().positive().default(1e6),
            /** Flag (warn + update.flagged event) a site whose declared sample count is over k × its own recent median. */
            samplesJumpFactor: z.number().gt(1).default(4),
            /** Accepted norms needed (this round and the last) before maxNormFactor applies. */
            normReference: z.number().int().min(1).default(3),
            minSamples: positiveInt.default(1),
            maxSamples: positiveInt.default(1_000_000),
          })
          .strict()
          .prefault({}),
        /**
         * Cap on one site's share of a round's FedAvg weight (Σ samples): weights above it are lowered at close so no
         * single declared sample count decides the model. 1 = off. With 2 reporting sites 0.5 means equal weights.
         */
        maxWeightShare: z.number().gt(0).max(1).default(0.5),
        /** Clip each update's delta to this L2 norm before combining (robustness, without noise). */
        clipNorm: z.number().positive().optional(),
        /** Client-level DP (DP-FedAvg): clip to clipNorm, add N(0, (noiseMultiplier·clipNorm)²) to the sum, divide by the sites asked. */
        dp: z
          .object({ clipNorm: z.number().positive(), noiseMultiplier: z.number().min(0), delta: z.number().gt(0).lt(1) })
          .strict()
          .optional(),
        /** Secure aggregation (docs/privacy.md): the coordinator sees only masked inputs and their sum; off by default. */
        secureAggregation: z
          .object({
            enabled: z.boolean().default(false),
            /** Shamir threshold t: the round closes only if at least t sites reach every phase; t ≤ minSites. */
            threshold: z.number().int().min(2).default(2),
            /** SecAgg+: mask with only k ring neighbours (even, t ≤ k < sites); absent = every pair. */
            neighbours: z.number().int().min(2).multipleOf(2).optional(),
            /** Quantisation range: each coordinate of (w/maxWeight)·Δ is clipped to ±clip before fixed-point encoding. */
            clip: z.number().positive().default(1),
            /** Largest sample weight a site may put in (its weight is min(samples, maxWeight)); the resolution shrinks in proportion. */
            maxWeight: positiveInt.default(10_000),
            /** A phase closes when every expected site answered, or this long after it opened if at least t did. */
            phaseSeconds: z.number().positive().default(30),
          })
          .strict()
          .prefault({}),
      })
      .strict()
      .prefault({})
      .refine((a) => !(a.dp && a.strategy !== 'fedavg'), { message: 'aggregation.dp needs strategy fedavg (the noise is calibrated to a clipped sum, not a median)' })
      .refine((a) => !(a.secureAggregation.enabled && a.strategy !== 'fedavg'), {
        message: 'aggregation.secureAggregation needs strategy fedavg: the coordinator only sees the sum, so a median or trimmed mean cannot be computed (drop secureAggregation or use fedavg)',
      })
      .refine((a) => !(a.secureAggregation.enabled && (a.validation.maxNorm !== undefined || !!a.validation.maxNormFactor || a.clipNorm !== undefined)), {
        message: 'aggregation.secureAggregation cannot check or clip single updates at the coordinator: remove validation.maxNorm / maxNormFactor and clipNorm (with dp, sites clip their own delta to dp.clipNorm)',
      })
      .refine((a) => !(a.secureAggregation.enabled && a.secureAggregation.neighbours !== undefined && a.secureAggregation.threshold > a.secureAggregation.neighbours), {
        message: 'aggregation.secureAggregation.threshold cannot exceed neighbours (shares are held only by a site\'s neighbours)',
      })
      // The relative norm bound is on unless the plan turns it off (0) or secure aggregation hides single updates.
      .transform((a) => {
        const { maxNormFactor, ...validation } = a.validation;
        const factor = maxNormFactor === 0 ? undefined : (maxNormFactor ?? (a.secureAggregation.enabled ? undefined : DEFAULT_MAX_NORM_FACTOR));
        return { ...a, validation: { ...validation, maxNormFactor: factor as number | undefined } };
      }),
    /** Federated noisy-student training (docs/teacher-student.md); off by default. */
    teacherStudent: TeacherStudentSchema.prefault({}),
    /** Federated self-supervised pretraining of the encoder before the fine-tuning rounds (docs/pretraining.md); off by default. */
    pretraining: PretrainingSchema.prefault({}),
    /** Encodings of what crosses the wire (docs/plan.md). */
    compression: z
      .object({
        /** How a site encodes its update: float32 (exact), float16, int8 (per-tensor affine). */
        update: z.enum(['float32', 'float16', 'int8']).default('float32'),
        /** Send the difference to the model the site started from instead of the weights. */
        delta: z.boolean().default(false),
        /** How sites download each global model: float32 (exact), float16, int8 (per-tensor affine). */
        model: z.enum(['float32', 'float16', 'int8']).default('float32'),
      })
      .strict()
      .prefault({}),
    /**
     * The coordinator's own privacy limits (docs/plan.md#privacy-budget). Never sent to sites: their tasks carry
     * aggregation.dp, and each site may cap its own ε in its policy (maxEpsilon).
     */
    privacy: z
      .object({
        /**
         * Client-level ε (at aggregation.dp.delta) the federation may spend: no round opens whose release would take
         * the accountant past it. Needs aggregation.dp with a noise multiplier above 0.
         */
        epsilonBudget: z.number().positive().finite().optional(),
      })
      .strict()
      .prefault({}),
    /** What the coordinator keeps on disk after a round has closed (docs/plan.md). */
    retention: z
      .object({
        /**
         * How many of the most recent closed rounds keep their update files (and secure-aggregation masked inputs);
         * older ones are deleted when a round closes. Only the open round's updates are ever read again (after a
         * restart), so any number is safe; 'all' keeps every one (model size × sites × rounds of disk).
         */
        updateRounds: z.union([z.literal('all'), z.number().int().min(0)]).default('all'),
      })
      .strict()
      .prefault({}),
  })
  .strict()
  .refine((p) => p.privacy.epsilonBudget === undefined || (p.aggregation.dp !== undefined && p.aggregation.dp.noiseMultiplier > 0), {
    message: 'privacy.epsilonBudget needs aggregation.dp with noiseMultiplier above 0 (without noise no ε can be accounted, so no round would fit any budget)',
    path: ['privacy', 'epsilonBudget'],
  })
  .refine((p) => !(p.aggregation.secureAggregation.enabled && p.aggregation.secureAggregation.threshold > p.minSites), {
    message: 'aggregation.secureAggregation.threshold must not exceed minSites (a round may open with minSites sites, and fewer than t can never unmask)',
  })
  .refine((p) => !(p.aggregation.secureAggregation.enabled && p.sitesPerRound > 0 && p.sitesPerRound < p.aggregation.secureAggregation.threshold), {
    message: 'sitesPerRound must be 0 (all) or at least aggregation.secureAggregation.threshold: a round of fewer than t sites can never unmask',
  })
  .refine((p) => !(p.pretraining.enabled && p.model.architecture !== 'med3d'), {
    message: 'pretraining needs model.architecture med3d (a separate encoder to pretrain under a site-local restoration decoder)',
  })
  .refine((p) => !(p.pretraining.enabled && (p.model.inputChannels ?? 1) !== 1), {
    message: 'pretraining restores one-channel patches: it needs model.inputChannels 1',
  })
  .refine((p) => !(p.pretraining.enabled && p.model.patch.some((s) => s % 8 !== 0)), {
    message: 'pretraining: the restoration decoder works on the full patch grid, so every side of model.patch must be a multiple of 8',
  })
  .refine((p) => !(p.aggregation.secureAggregation.enabled && (p.compression.update !== 'float32' || p.compression.delta)), {
    message: 'compression.update / compression.delta apply to plain uploads; with aggregation.secureAggregation sites send masked 32-bit ring words (leave compression.update float32 and delta false)',
  });

export type Plan = z.infer<typeof PlanSchema>;

/** Local steps for a site with `numTrain` labelled cases. */
export function localSteps(plan: Plan, numTrain: number): number {
  if (plan.local.steps !== undefined) return plan.local.steps;
  const epochs = plan.local.epochs ?? 1;
  return Math.max(1, Math.ceil((epochs * Math.max(1, numTrain)) / plan.local.batchSize));
}
