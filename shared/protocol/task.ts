/**
 * What a TRAIN task tells a site, and the bytes the coordinator signs so a site can tell a genuine task
 * from one injected on the way (TLS protects the channel; the signature pins the author).
 */
import { z } from 'zod';
import { PlanSchema, PretrainingSchema, TeacherStudentSchema, type Plan } from '../plan/schema.ts';
import { OptimizerSpecSchema } from '../model/optim.ts';
import { LrScheduleSchema } from '../model/lr-schedule.ts';
import { DataSettingsSchema } from '../plan/data-settings.ts';

export const TaskSettingsSchema = z
  .object({
    federation: z.string(),
    model: PlanSchema.shape.model.unwrap(),
    local: z.object({
      steps: z.number().int().positive().optional(),
      epochs: z.number().positive().optional(),
      batchSize: z.number().int().positive(),
      learningRate: z.number().positive(),
      proximalMu: z.number().min(0),
      optimizer: OptimizerSpecSchema.optional(),
      schedule: LrScheduleSchema.optional(),
      /** Absent from older coordinators: `own`. */
      keepMoments: z.enum(['own', 'all']).optional(),
    }),
    /**
     * The plan's number of rounds: with the task's round it places a site's local steps on the federation-wide
     * learning-rate schedule (local.schedule). Absent from older coordinators; the schedule then spans one round.
     */
    totalRounds: z.number().int().positive().optional(),
    /**
     * Present only in the rounds of the plan's pretraining stage: train the encoder with this self-supervised
     * objective on every scan under the site's own restoration decoder (kept in its own local file), and send back
     * the shared tensors as usual. `round` counts the stage's rounds (1..rounds). Absent from older coordinators.
     */
    pretraining: PretrainingSchema.omit({ enabled: true })
      .extend({ round: z.number().int().positive() })
      .strict()
      .optional(),
    /**
     * Rounds of earlier stages (pretraining) before the fine-tuning rounds: a fine-tuning task's round minus this is
     * its place among the plan's `totalRounds` (the learning-rate schedule). Absent = 0.
     */
    roundOffset: z.number().int().min(0).optional(),
    share: PlanSchema.shape.share.unwrap(),
    /** Names of the tensors the site must send back, exactly. */
    sharedTensors: z.array(z.string()),
    /** How sites prepare scans (spacing, normalisation, sampling, augmentation); absent = defaults. */
    data: DataSettingsSchema.optional(),
    /** How to encode the update (plan compression); absent = float32 weights. */
    compression: z.object({ update: z.enum(['float32', 'float16', 'int8']), delta: z.boolean(), model: z.enum(['float32', 'float16', 'int8']).optional() }).strict().optional(),
    /** The global model encoded for download (plan compression.model), by hash and size; absent = download the task's modelHash. */
    modelFile: z.object({ hash: z.string().regex(/^[0-9a-f]{64}$/), size: z.number().int().positive(), encoding: z.enum(['float16', 'int8']) }).strict().optional(),
    /** Noisy-student settings (plan teacherStudent); absent when off. */
    teacherStudent: TeacherStudentSchema.optional(),
    /** The current teacher model version (absent until the first promotion); downloaded by hash like the model. */
    teacher: z.object({ modelHash: z.string().regex(/^[0-9a-f]{64}$/), modelSize: z.number().int().positive(), generation: z.number().int().positive() }).strict().optional(),
    /** Client-level DP the coordinator applies to this round's aggregate (absent: none). */
    dp: z.object({ clipNorm: z.number().positive(), noiseMultiplier: z.number().min(0), delta: z.number().gt(0).lt(1) }).strict().optional(),
    /** This round uses secure aggregation (plan aggregation.secureAggregation): send a masked input, not an upload. */
    secureAggregation: z
      .object({
        id: z.number().int().min(1),
        threshold: z.number().int().min(2),
        neighbours: z.number().int().min(2).optional(),
        clip: z.number().positive(),
        maxWeight: z.number().int().positive(),
        sites: z.number().int().min(2),
        vectorLength: z.number().int().min(2),
      })
      .strict()
      .optional(),
    /**
     * Site features (shared/protocol/features.ts) this task cannot be run without: a site lacking one refuses it.
     * Only sent to sites of protocol version 2 on (shared/protocol/compatibility.ts); absent = none.
     */
    requires: z.array(z.string().max(64)).max(32).optional(),
  })
  .strict();

export type TaskSettings = z.infer<typeof TaskSettingsSchema>;

/**
 * The settings a site trains under for a plan, outside a running coordinator (the experiment simulator, a site
 * scoring a model): the plan's model (without the coordinator's file paths), local training, sharing and data.
 */
export function taskSettingsForPlan(plan: Plan, federation: string, sharedTensors: readonly string[], extra: Partial<TaskSettings> = {}): TaskSettings {
  return TaskSettingsSchema.parse({
    federation,
    model: { ...plan.model, pretrained: undefined, source2d: undefined },
    local: plan.local,
    share: plan.share,
    sharedTensors: [...sharedTensors],
    data: plan.data,
    totalRounds: plan.rounds,
    ...extra,
  });
}

export interface TaskManifest {
  taskId: string;
  kind: string;
  round: number;
  modelHash: string;
  modelSize: number;
  deadlineUnixMs: number;
  settingsJson: string;
}

/** Canonical bytes of a task: fixed field order, so both sides hash the same thing. */
export function manifestBytes(t: TaskManifest): Buffer {
  return Buffer.from(
    JSON.stringify(['medfl.v1.Task', t.taskId, t.kind, t.round, t.modelHash, t.modelSize, t.deadlineUnixMs, t.settingsJson]),
    'utf8',
  );
}
