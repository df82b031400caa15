/**
 * The plan's data settings (shared/plan/data-settings.ts, the `data` section of a plan) mapped to this
 * site's loader options.
 */
import type { AugmentOptions } from './augment.ts';
import type { DataLogger, SiteDataOptions } from './site-data.ts';
import type { Shape3 } from './types.ts';
import type { DataSettings } from '../../shared/plan/data-settings.ts';

export { AugmentSettingsSchema, DataSettingsSchema, type DataSettings } from '../../shared/plan/data-settings.ts';

export function siteDataOptions(settings: DataSettings, patch: Shape3, log?: DataLogger): SiteDataOptions {
  return {
    patch,
    ...(settings.spacing ? { spacing: settings.spacing } : {}),
    normalization: settings.normalization,
    biasCorrection: settings.biasCorrection,
    ctWindow: settings.ctWindow,
    foregroundFraction: settings.foregroundFraction,
    cacheBytes: Math.round(settings.cacheMiB * 2 ** 20),
    // Training sites always get a validation split: model selection and the teacher gate need one.
    carveValidation: true,
    ...(log ? { log } : {}),
  };
}

export function augmentOptions(settings: DataSettings): AugmentOptions | false {
  return settings.augment;
}
