/**
 * The protocol version and optional features of each side (docs/compatibility.md).
 *
 * Coordinator features are named in HeartbeatResponse.features: a site uses one only after its coordinator named
 * it, so new sites keep working with older coordinators (which send no list) and older sites never use one.
 * Site features are named in SubscribeRequest.features with the site's protocol version: the coordinator sends a
 * site no task that needs a feature it did not name (coordinator/rounds/task-offers.ts), and lists the features a
 * task needs in its signed settings (`requires`), so a site refuses one it cannot honour.
 */

/**
 * 1: releases before versioning (up to 3b6b42d), which announce nothing. 2: sites announce version and features when
 * they subscribe; task settings may carry `requires`; site decoders ignore unknown tuning fields (docs/compatibility.md).
 */
export const PROTOCOL_VERSION = 2;

/** What a site that announced no version is taken to be: protocol 1, none of the features below. */
export const LEGACY_PROTOCOL_VERSION = 1;

export const FEATURES = {
  /**
   * UploadUpdate: the header may leave `sha256` empty and an UpdateTrailer carries it as the last message,
   * so the site hashes the update while it sends it instead of before (about 0.1 s per 130 MB update).
   */
  uploadSha256Trailer: 'upload-sha256-trailer',
  /**
   * UploadUpdate: the coordinator sends its response headers, carrying UPLOAD_ADMITTED_KEY, the moment it admits the
   * upload (transfer-admission.ts), and a site that saw the feature sends nothing on the call — not even the update
   * header — until then. So an upload waiting for its slot holds no update bytes at the coordinator.
   */
  uploadGoAhead: 'upload-go-ahead',
  /**
   * Site: honours `local.keepMoments: all` (keeps the optimiser moments of shared tensors between rounds). A site
   * without it would silently restart them every round, i.e. train differently from the plan.
   */
  localKeepMoments: 'local-keep-moments',
  /**
   * Site: honours `model.inference` (sliding-window scoring and flip TTA of validation, test and pseudo-labels). A
   * site without it would refuse the unknown field; one that dropped it would label and score differently from the plan.
   */
  windowInference: 'window-inference',
  /**
   * Site: honours `teacherStudent.confidenceTarget` (the pseudo-label confidence threshold calibrated on its
   * validation cases). A site without it would refuse the unknown field.
   */
  calibratedConfidence: 'calibrated-confidence',
  /** Site: knows `data.normalization: quantile`. A site without it would refuse the settings as malformed. */
  quantileNormalization: 'quantile-normalization',
  /**
   * Site: honours the scanner-difference augmentation fields of `data.augment` (bias field, blur, coarser grid,
   * contrast). A site of the previous release refuses them as unknown; a later one without them would drop them.
   */
  scannerAugmentation: 'scanner-augmentation',
  /**
   * Site: honours `data.biasCorrection` (MRI bias-field correction before normalisation). A site of the previous
   * release refuses the unknown field; one that dropped it would feed the model differently prepared scans.
   */
  biasFieldCorrection: 'bias-field-correction',
  /**
   * Site: compares its teacher with the model it received, on its validation cases, every round, and uses
   * pseudo-labels only while the teacher is not behind by more than `teacherStudent.modelMargin`. A site without it
   * would refuse the unknown field; it trains with its teacher as before, so the field is dropped for it.
   */
  teacherModelCheck: 'teacher-model-check',
} as const;

export type Feature = (typeof FEATURES)[keyof typeof FEATURES];

/** What this coordinator accepts; sent with every heartbeat answer. */
export const COORDINATOR_FEATURES: readonly Feature[] = [FEATURES.uploadSha256Trailer, FEATURES.uploadGoAhead];

/** What this site honours; sent with every SubscribeTasks request. */
export const SITE_FEATURES: readonly Feature[] = [
  FEATURES.localKeepMoments,
  FEATURES.windowInference,
  FEATURES.calibratedConfidence,
  FEATURES.quantileNormalization,
  FEATURES.scannerAugmentation,
  FEATURES.biasFieldCorrection,
  FEATURES.teacherModelCheck,
];

/** A site's protocol version and features, as it announced them when it subscribed (legacy: version 1, none). */
export interface SiteCapabilities {
  readonly protocolVersion: number;
  readonly features: ReadonlySet<string>;
}

export const LEGACY_SITE: SiteCapabilities = { protocolVersion: LEGACY_PROTOCOL_VERSION, features: new Set() };
