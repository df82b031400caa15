/**
 * The site's own policy: what this hospital agrees to, whatever the coordinator's plan says. It lives in
 * the site directory (`policy.yaml`, `policy.yml` or `policy.json`), never in the plan, and the agent
 * checks every new TRAIN task against it before downloading anything. A task that breaks it is declined:
 * a warn log line here and the reason sent to the coordinator (Governance.DeclineTask), which logs it
 * and publishes a `task.declined` event.
 *
 *   # policy.yaml
 *   dp:
 *     required: true        # refuse any round without client-level DP
 *     maxEpsilon: 8         # refuse a round that would take this site's spent ε above 8 …
 *     delta: 1.0e-5         # … measured at this δ (default 1e-5)
 *     minNoiseMultiplier: 0.8
 *     samplingRate: 1       # what the site assumes its chance of being asked is (1 = no amplification)
 *   share:
 *     parts: [encoder]      # parts that may leave; a plan sharing the head is refused
 *     keepLocal: [norm]     # layer types that must stay here (the plan must keep them local, e.g. FedBN)
 *   maxRounds: 50           # rounds this site will train in, in this federation
 *
 * Default-deny: with no policy file, or one without `share.parts`, only encoder tensors may leave (DEFAULT_SHARED_PARTS).
 * A coordinator (compromised, or with a careless plan) cannot make the site send its head; sharing it needs this
 * hospital's own `share: { parts: [encoder, head] }`. `medfl site enroll` writes a commented default (DEFAULT_POLICY_YAML).
 *
 * Spent privacy: each accepted DP round composes one sampled-Gaussian release (noise multiplier z from
 * the task, sampling rate from the policy) into an RDP accountant kept in `privacy-spent.json` beside the
 * policy, per federation, written before training starts (a round counts as spent once accepted, even if
 * training later fails: conservative). The noise is added by the coordinator (central DP), so this ε is
 * what the site has spent *if the coordinator applies the settings it announced in the signed task*.
 */
import * as grpc from '@grpc/grpc-js';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { LayerTypeSchema, ModelPartSchema } from '../shared/plan/schema.ts';
import type { TaskSettings } from '../shared/protocol/task.ts';
import { architectureFor } from '../shared/model/registry.ts';
import type { ParamInfo } from '../shared/model/types.ts';
import { RdpAccountant, RdpAccountantStateSchema } from '../shared/privacy/rdp-accountant.ts';
import { writeFileAtomic } from '../shared/util/fs-atomic.ts';
import { parseYamlConfig } from '../shared/util/yaml-config.ts';
import type { SiteConnection } from './transport/connection.ts';
import type { Logger } from '../shared/util/log.ts';

export const POLICY_FILES = ['policy.yaml', 'policy.yml', 'policy.json'] as const;
export const PRIVACY_SPENT_FILE = 'privacy-spent.json';
/** What may leave a site whose policy says nothing about sharing: the encoder only (heads stay at the hospital). */
export const DEFAULT_SHARED_PARTS: readonly ('encoder' | 'head')[] = ['encoder'];

/** The policy `medfl site enroll` writes: the defaults spelled out, every other knob shown commented. */
export const DEFAULT_POLICY_YAML = `# This site's own policy: checked before every task, whatever the coordinator's plan says.
# A task that breaks it is declined (the reason goes to the coordinator). See docs/security.md.
share:
  # Model parts that may leave this site. Only the encoder by default: the head stays here.
  # Add head only if this hospital agrees to share it:  parts: [encoder, head]
  parts: [encoder]
  # Layer types that must stay here even inside shared parts (e.g. FedBN):
  # keepLocal: [norm]
# dp:
#   required: true        # refuse any round without client-level DP
#   maxEpsilon: 8         # refuse a round that would take this site's spent epsilon above 8
#   delta: 1.0e-5
#   minNoiseMultiplier: 0.8
# maxRounds: 50           # rounds this site will train in, in this federation
`;

export const SitePolicySchema = z
  .object({
    dp: z
      .object({
        required: z.boolean().default(false),
        /** Cap on this site's cumulative ε (at `delta`); implies DP is required. */
        maxEpsilon: z.number().positive().optional(),
        delta: z.number().gt(0).lt(1).default(1e-5),
        minNoiseMultiplier: z.number().positive().optional(),
        samplingRate: z.number().gt(0).max(1).default(1),
      })
      .strict()
      .optional(),
    share: z
      .object({
        parts: z.array(ModelPartSchema).min(1).optional(),
        keepLocal: z.array(LayerTypeSchema).optional(),
      })
      .strict()
      .optional(),
    maxRounds: z.number().int().positive().optional(),
  })
  .strict();

export type SitePolicyConfig = z.infer<typeof SitePolicySchema>;

export class PolicyError extends Error {
  override name = 'PolicyError';
  constructor(readonly source: string, readonly problems: string[]) {
    super(`site policy ${source} is invalid:\n  ${problems.join('\n  ')}\nFix the policy file (without one, only encoder tensors may leave) and start the agent again.`);
  }
}

export function parsePolicy(text: string, source = 'policy'): SitePolicyConfig {
  return parseYamlConfig(text, source, SitePolicySchema, (problems) => new PolicyError(source, problems));
}

const SpentSchema = z
  .object({
    federation: z.string(),
    /** Task ids accepted (a re-sent task is not counted twice). */
    tasks: z.array(z.string()),
    /** Distinct rounds accepted. */
    rounds: z.array(z.number().int()),
    /** Rounds accepted without DP (ε is unbounded once one is there). */
    nonDpRounds: z.number().int().min(0),
    accountant: RdpAccountantStateSchema,
  })
  .strict();
type Spent = z.infer<typeof SpentSchema>;

export type Verdict = { ok: true; epsilon?: number } | { ok: false; reason: string };

export interface TaskRef {
  taskId: string;
  round: number;
}

export class SitePolicy {
  private spent: Spent;

  private constructor(
    readonly config: SitePolicyConfig | undefined,
    readonly source: string | undefined,
    private readonly spentPath: string,
    federation: string,
  ) {
    this.spent = SitePolicy.readSpent(spentPath, federation);
  }

  /** The policy in `dir` (none there: the defaults, i.e. only encoder tensors leave; DP spend is still tracked). */
  static load(dir: string, federation: string): SitePolicy {
    const file = POLICY_FILES.map((f) => join(dir, f)).find((p) => existsSync(p));
    const config = file ? parsePolicy(readFileSync(file, 'utf8'), file) : undefined;
    return new SitePolicy(config, file, join(dir, PRIVACY_SPENT_FILE), federation);
  }

  /** For tests and embedding: a policy from an object, spend kept at `spentPath`. */
  static fromConfig(config: unknown, spentPath: string, federation: string): SitePolicy {
    const r = SitePolicySchema.safeParse(config);
    if (!r.success) throw new PolicyError('(object)', r.error.issues.map((i) => `${i.path.join('.') || '(top level)'}: ${i.message}`));
    return new SitePolicy(r.data, '(object)', spentPath, federation);
  }

  private static readSpent(path: string, federation: string): Spent {
    const fresh = (): Spent => ({ federation, tasks: [], rounds: [], nonDpRounds: 0, accountant: new RdpAccountant().toJSON() });
    if (!existsSync(path)) return fresh();
    let raw: unknown;
    try {
      raw = JSON.parse(readFileSync(path, 'utf8'));
    } catch (e) {
      throw new Error(`${path} is not valid JSON (${(e as Error).message}); it records this site's spent privacy — restore it from a backup rather than deleting it.`);
    }
    const r = SpentSchema.safeParse(raw);
    if (!r.success) throw new Error(`${path} is not a privacy-spent record (${r.error.issues[0]?.path.join('.')}: ${r.error.issues[0]?.message}); restore it from a backup rather than deleting it.`);
    // One site directory is one enrolment: a record from another federation (the directory was re-enrolled) does not carry over.
    if (r.data.federation !== federation) return fresh();
    return r.data;
  }

  /** ε this site has spent so far in this federation, at the policy's δ (∞ once a non-DP round was accepted). */
  spentEpsilon(delta = this.config?.dp?.delta ?? 1e-5): number {
    if (this.spent.nonDpRounds > 0) return Number.POSITIVE_INFINITY;
    return RdpAccountant.fromJSON(this.spent.accountant).epsilon(delta).epsilon;
  }

  get roundsAccepted(): number {
    return this.spent.rounds.length;
  }

  /** Checks a task without recording anything. */
  check(task: TaskRef, settings: TaskSettings): Verdict {
    if (this.spent.tasks.includes(task.taskId)) return { ok: true };
    const c = this.config;
    const dp = settings.dp;
    const reasons: string[] = [];
    if (c?.dp) {
      const needDp = c.dp.required || c.dp.maxEpsilon !== undefined;
      if (needDp && (!dp || dp.noiseMultiplier <= 0)) {
        reasons.push('site policy requires differential privacy, but this round has none (set aggregation.dp with noiseMultiplier > 0 in the plan)');
      } else if (dp) {
        if (c.dp.minNoiseMultiplier !== undefined && dp.noiseMultiplier < c.dp.minNoiseMultiplier) {
          reasons.push(`noise multiplier ${dp.noiseMultiplier} is below the site's minimum ${c.dp.minNoiseMultiplier}`);
        }
        if (c.dp.maxEpsilon !== undefined && dp.noiseMultiplier > 0) {
          const after = RdpAccountant.fromJSON(this.spent.accountant);
          after.step(c.dp.samplingRate, dp.noiseMultiplier);
          const eps = this.spent.nonDpRounds > 0 ? Number.POSITIVE_INFINITY : after.epsilon(c.dp.delta).epsilon;
          if (eps > c.dp.maxEpsilon) {
            reasons.push(`this round would bring the site's spent ε to ${eps.toFixed(3)} (δ=${c.dp.delta}), above its cap ${c.dp.maxEpsilon}; already spent ${this.spentEpsilon().toFixed(3)} over ${this.spent.rounds.length} round(s)`);
          }
        }
      }
    }
    const allowedParts = c?.share?.parts ?? DEFAULT_SHARED_PARTS;
    const extra = settings.share.parts.filter((p) => !allowedParts.includes(p));
    if (extra.length > 0) {
      const why = c?.share?.parts ? '' : ' (the default without share.parts in policy.yaml)';
      reasons.push(`the plan shares part(s) ${extra.join(', ')}, but site policy lets only ${allowedParts.join(', ')} leave${why}`);
    }
    if (c?.share?.keepLocal) {
      const leaking = c.share.keepLocal.filter((t) => !settings.share.keepLocal.includes(t));
      if (leaking.length > 0) reasons.push(`site policy keeps layer type(s) ${leaking.join(', ')} local, but the plan would send them (add them to share.keepLocal)`);
    }
    // What actually leaves is the task's list of tensor names: check each one's part and layer type too, always,
    // so a task whose list disagrees with its share spec cannot slip a head or a norm layer out.
    const problem = this.checkTensorList(settings, allowedParts);
    if (problem) reasons.push(problem);
    if (c?.maxRounds !== undefined && !this.spent.rounds.includes(task.round) && this.spent.rounds.length >= c.maxRounds) {
      reasons.push(`site policy caps participation at ${c.maxRounds} round(s) and this site has trained in ${this.spent.rounds.length}`);
    }
    if (reasons.length > 0) return { ok: false, reason: `${reasons.join('; ')} [policy ${this.source ?? '(none)'}]` };
    return { ok: true };
  }

  private checkTensorList(settings: TaskSettings, allowedParts: readonly string[]): string | undefined {
    const keepLocal = this.config?.share?.keepLocal;
    let params: readonly ParamInfo[];
    try {
      params = architectureFor(settings.model).params();
    } catch (e) {
      return `cannot tell which parameter groups the task's tensors belong to (${(e as Error).message})`;
    }
    const byName = new Map(params.map((p) => [p.name, p]));
    const bad: string[] = [];
    for (const name of settings.sharedTensors) {
      const p = byName.get(name);
      if (!p) bad.push(`${name} (not a parameter of ${settings.model.architecture})`);
      else if (!allowedParts.includes(p.part)) bad.push(`${name} (part ${p.part})`);
      else if (keepLocal?.includes(p.layerType)) bad.push(`${name} (layer type ${p.layerType})`);
    }
    if (bad.length === 0) return undefined;
    return `the task asks for ${bad.length} tensor(s) site policy keeps here: ${bad.slice(0, 5).join(', ')}${bad.length > 5 ? ', …' : ''}`;
  }

  /** Checks a task and, if it passes, records it as spent (durably, before any training). */
  admit(task: TaskRef, settings: TaskSettings): Verdict {
    const v = this.check(task, settings);
    if (!v.ok || this.spent.tasks.includes(task.taskId)) return v;
    const next: Spent = structuredClone(this.spent);
    next.tasks.push(task.taskId);
    if (!next.rounds.includes(task.round)) next.rounds.push(task.round);
    if (settings.dp && settings.dp.noiseMultiplier > 0) {
      const acc = RdpAccountant.fromJSON(next.accountant);
      acc.step(this.config?.dp?.samplingRate ?? 1, settings.dp.noiseMultiplier);
      next.accountant = acc.toJSON();
    } else {
      next.nonDpRounds++;
    }
    writeFileAtomic(this.spentPath, JSON.stringify(next, null, 2) + '\n');
    this.spent = next;
    return settings.dp && settings.dp.noiseMultiplier > 0 ? { ok: true, epsilon: this.spentEpsilon() } : { ok: true };
  }
}

/** Tells the coordinator why this site declines a task. Never throws: a coordinator without the RPC only loses the reason. */
export async function declineTask(connection: SiteConnection, req: { round: number; taskId: string; reason: string }, log: Logger): Promise<boolean> {
  const client = connection.governance();
  try {
    const ack = await new Promise<{ recorded: boolean }>((resolve, reject) =>
      client.DeclineTask(req, { deadline: Date.now() + 10_000 }, (err: grpc.ServiceError | null, res: { recorded: boolean }) => (err ? reject(err) : resolve(res))),
    );
    return ack.recorded;
  } catch (e) {
    log.warn({ task: req.taskId, reason: (e as grpc.ServiceError).details ?? (e as Error).message }, 'could not tell the coordinator why the task was declined');
    return false;
  }
}
