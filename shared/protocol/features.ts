/**
 * Optional protocol features, named in HeartbeatResponse.features by the coordinators that accept them.
 * A site uses one only after its coordinator named it, so new sites keep working with older coordinators
 * (which send no list) and older sites simply never use a feature.
 */
export const FEATURES = {
  /**
   * UploadUpdate: the header may leave `sha256` empty and an UpdateTrailer carries it as the last message,
   * so the site hashes the update while it sends it instead of before (about 0.1 s per 130 MB update).
   */
  uploadSha256Trailer: 'upload-sha256-trailer',
} as const;

export type Feature = (typeof FEATURES)[keyof typeof FEATURES];

/** What this coordinator accepts; sent with every heartbeat answer. */
export const COORDINATOR_FEATURES: readonly Feature[] = [FEATURES.uploadSha256Trailer];
