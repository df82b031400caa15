/**
 * The site's own task: which head this hospital trains on the federation's shared encoder (federated
 * Med3D-style pretraining — one encoder, a head per site for that site's label set, segmentation at one
 * site and classification at another). It lives in the site directory (`task.yaml`, `task.yml` or
 * `task.json`) next to `policy.yaml`, never in the plan, and describes the whole head:
 *
 *   # task.yaml
 *   head: classification     # segmentation | unet | classification
 *   numClasses: 3            # segmentation/unet: background included, 2..255; classification: 2..65535
 *   dropout: 0.2             # classification only (default 0)
 *   # headChannels: 8        # segmentation/unet only (default 32 × widthMultiplier; unet at least 8)
 *
 * Fields left out take the architecture's defaults, not the plan's. The site builds the plan's encoder
 * with this head; the tensors it sends are the plan's shared tensors (the encoder) and nothing else, so
 * the coordinator sees the same update as from any other site. The head is site-local by construction:
 * a plan that shares the head (`share.parts` lists `head`) cannot be combined with a site's own head and
 * is refused. Without a task file the site trains the plan's head.
 */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { architectureFor } from '../shared/model/registry.ts';
import { sharedParams } from '../shared/model/sharing.ts';
import type { TaskSettings } from '../shared/protocol/task.ts';
import { parseYamlConfig } from '../shared/util/yaml-config.ts';

export const SITE_TASK_FILES = ['task.yaml', 'task.yml', 'task.json'] as const;

export const SiteTaskSchema = z
  .object({
    /** Free text for the people at the site (e.g. "lesion present, 0 = no / 1 = yes"). */
    description: z.string().optional(),
    /** segmentation: MedicalNet's ¼-resolution head; unet: full-resolution decoder over the encoder's skips. */
    head: z.enum(['segmentation', 'unet', 'classification']),
    numClasses: z.number().int().min(2).max(65535),
    /** Segmentation/unet head channels (default 32 × widthMultiplier, as MedicalNet; unet at least 8). */
    headChannels: z.number().int().positive().optional(),
    /** Classification head dropout before the dense layer while training (default 0). */
    dropout: z.number().min(0).lt(1).optional(),
  })
  .strict()
  .superRefine((t, ctx) => {
    if (t.head !== 'classification' && t.numClasses > 255) {
      ctx.addIssue({ code: 'custom', path: ['numClasses'], message: `a ${t.head} head has at most 255 classes (labels are bytes), got ${t.numClasses}` });
    }
    if (t.head !== 'classification' && t.dropout !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['dropout'], message: 'dropout is for a classification head; remove it or set head: classification' });
    }
    if (t.head === 'classification' && t.headChannels !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['headChannels'], message: 'headChannels is for a segmentation head (segmentation or unet); remove it or set head: segmentation or unet' });
    }
  });

export type SiteTaskConfig = z.infer<typeof SiteTaskSchema>;

export class SiteTaskError extends Error {
  override name = 'SiteTaskError';
  constructor(readonly source: string, readonly problems: string[]) {
    super(`site task file ${source} is invalid:\n  ${problems.join('\n  ')}\nFix the task file (or remove it to train the plan's head) and start the agent again.`);
  }
}

/** Parses and validates a task file's text; problems come back as "SOURCE:LINE: key: message". */
export function parseSiteTask(text: string, source = 'task.yaml'): SiteTaskConfig {
  return parseYamlConfig(text, source, SiteTaskSchema, (problems) => new SiteTaskError(source, problems));
}

/** A site's task: its head, and the file it came from (for messages). */
export interface SiteTask {
  readonly config: SiteTaskConfig;
  readonly source: string;
}

/** The task file in `dir`, if there is one (throws SiteTaskError when it is invalid). */
export function loadSiteTask(dir: string): SiteTask | undefined {
  const file = SITE_TASK_FILES.map((f) => join(dir, f)).find((p) => existsSync(p));
  if (!file) return undefined;
  return { config: parseSiteTask(readFileSync(file, 'utf8'), file), source: file };
}

/** One line for logs and errors, e.g. "classification head, 3 classes". */
export function describeSiteTask(t: SiteTaskConfig): string {
  return `${t.head} head, ${t.numClasses} classes`;
}

/**
 * The task settings with the plan's head replaced by the site's: same encoder, same shared tensor names.
 * Throws, saying what to do, when the plan cannot take a site head: it is not med3d, it shares the head,
 * or (defensively) the site's architecture would share other tensors than the plan names.
 */
export function applySiteTask(settings: TaskSettings, task: SiteTask | undefined): TaskSettings {
  if (!task) return settings;
  const t = task.config;
  const plan = settings.model;
  if (plan.architecture !== 'med3d') {
    throw new Error(
      `this site's task file (${task.source}) gives it its own ${describeSiteTask(t)}, but the plan's model is ${plan.architecture}, which has no separate head; ` +
        'per-site heads need model.architecture: med3d. Remove the task file to train the plan\'s model, or ask the coordinator admin for a med3d plan.',
    );
  }
  if (t.head !== 'classification' && plan.patch.some((d) => d % 8 !== 0)) {
    throw new Error(
      `this site's task file (${task.source}) asks for a ${t.head} head, which needs patch sides that are multiples of 8, but the plan's patch is [${plan.patch.join(', ')}]; ` +
        'use head: classification, or ask the coordinator admin for a patch that divides by 8.',
    );
  }
  const { headChannels: _planChannels, ...encoder } = plan;
  const model: TaskSettings['model'] = {
    ...encoder,
    head: t.head,
    numClasses: t.numClasses,
    ...(t.head !== 'classification' && t.headChannels !== undefined ? { headChannels: t.headChannels } : {}),
    dropout: t.head === 'classification' ? (t.dropout ?? 0) : 0,
  };
  const sameHead = model.head === plan.head && model.numClasses === plan.numClasses && model.headChannels === plan.headChannels && model.dropout === plan.dropout;
  if (settings.share.parts.includes('head') && !sameHead) {
    throw new Error(
      `this site's task file (${task.source}) gives it its own ${describeSiteTask(t)}, but the plan shares the head (share.parts: [${settings.share.parts.join(', ')}]), ` +
        `so every site must train the plan's ${plan.head} head with ${plan.numClasses} classes. Remove the task file (or make it match the plan's head), ` +
        'or ask the coordinator admin to share only the encoder (share.parts: [encoder]).',
    );
  }
  let arch;
  try {
    arch = architectureFor(model);
  } catch (e) {
    throw new Error(`this site's task file (${task.source}) does not fit the plan's model: ${(e as Error).message}`);
  }
  const names = sharedParams(arch, settings.share).map((p) => p.name).sort();
  const expected = [...settings.sharedTensors].sort();
  if (names.length !== expected.length || names.some((n, i) => n !== expected[i])) {
    const missing = expected.filter((n) => !names.includes(n));
    const extra = names.filter((n) => !expected.includes(n));
    throw new Error(
      `with this site's head (${task.source}) the model would share other tensors than the plan names` +
        `${missing.length ? ` (missing ${missing.slice(0, 3).join(', ')}${missing.length > 3 ? ', …' : ''})` : ''}` +
        `${extra.length ? ` (extra ${extra.slice(0, 3).join(', ')}${extra.length > 3 ? ', …' : ''})` : ''}; ` +
        'a site head only works when the plan shares the encoder alone. Remove the task file or ask the coordinator admin to share only the encoder.',
    );
  }
  return { ...settings, model };
}
