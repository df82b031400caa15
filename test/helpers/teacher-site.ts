/**
 * A small phantom site for teacher–student tests (3 labelled cases, 1 of them validation, 2 unlabelled), the update
 * its first round makes from scratch (a teacher that finds something), and the same tensors all zero (a teacher, or a
 * received model, that finds nothing: validation Dice 0).
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import { LocalTraining } from '../../site-agent/training/local-training.ts';
import { writePhantomSite } from '../../site-agent/data/phantom.ts';
import { writePhantomPool } from '../../site-agent/training/phantom-pool.ts';
import type { Plan } from '../../shared/plan/schema.ts';
import type { TaskSettings } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick, sharedParams } from '../../shared/model/sharing.ts';
import { decodeSafetensors, encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { makeBundle } from '../../shared/tensors/bundle.ts';

export async function teacherSite(work: string, dataDir: string, plan: Plan, settings: TaskSettings, log: Logger): Promise<{ round1Update: Buffer; blank: Buffer }> {
  await writePhantomSite(dataDir, { siteName: 'site-a', cases: 3, valCases: 1, size: [16, 16, 16], seed: 11, intensityShift: 0 });
  await writePhantomPool(dataDir, { siteName: 'site-a', cases: 2, size: [16, 16, 16], seed: 11, intensityShift: 0 });
  const arch = architectureFor(plan.model);
  const first = new LocalTraining({ siteName: 'site-a', dataDir, localDir: join(work, 'first'), log, engine: 'cpu' });
  const round1Update = (await first.run(settings, encodeSafetensors(pick(arch.init(plan.model.seed), sharedParams(arch, plan.share))), { round: 1 })).update;
  const blank = encodeSafetensors(makeBundle([...decodeSafetensors(round1Update).bundle.values()].map((t) => ({ ...t, data: new Float32Array(t.data.length) }))));
  return { round1Update, blank };
}
