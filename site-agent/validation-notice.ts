/**
 * A check `medfl site run` makes before it connects: whether the data folder gives this site any validation case.
 * Without one the site still trains, but reports no validation Dice (the coordinator's status and dashboard then show
 * "no validation data"), and the teacher gate of a noisy-student plan fails closed. Better said at start than found
 * as a dash in a table after the federation is over.
 */
import { SiteData } from './data/site-data.ts';
import { siteDataOptions, DataSettingsSchema } from './data/settings.ts';

export interface ValidationNotice {
  /** Usable validation cases as the site's training will find them (held-back imagesTs + labelsTs, or carved). */
  validationCases: number;
  /** Labelled training cases. */
  trainingCases: number;
  /** Set when there is no validation case: what to tell the site admin. */
  warning?: string;
}

/**
 * Reads the folder the way training opens it (file names and dataset.json only: no volume is read), with the
 * default data settings. The plan's own data settings come with the first task; they change preprocessing, not
 * which cases are held back, so the count is the one training will use.
 */
export async function validationNotice(dataDir: string): Promise<ValidationNotice> {
  const data = await SiteData.open(dataDir, siteDataOptions(DataSettingsSchema.parse({}), [16, 16, 16]));
  const validationCases = data.val.filter((r) => !data.isBad(r)).length;
  const trainingCases = data.train.filter((r) => !data.isBad(r)).length;
  if (validationCases > 0) return { validationCases, trainingCases };
  return {
    validationCases,
    trainingCases,
    warning:
      `no validation cases in ${dataDir}: this site will report no validation Dice (shown as "no validation data" by the coordinator). ` +
      `Add labelled held-back cases (imagesTs/ + labelsTs/), or at least 5 labelled training cases so a share is held back (this folder has ${trainingCases}).`,
  };
}
