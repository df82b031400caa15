/**
 * The coordinator's task signer: what it returns is the manifest it was given with a signature a site accepts (the
 * check the site agent makes against the key it pinned at enrolment), and a manifest altered after signing is refused.
 */
import { describe, expect, it } from 'vitest';
import { keyTaskSigner } from '../../../coordinator/rounds/task-signer.ts';
import { manifestBytes, type TaskManifest } from '../../../shared/protocol/task.ts';
import { generateCoordinatorKey, verifyManifest } from '../../../shared/security/site-identity.ts';

const manifest: TaskManifest = {
  taskId: 'r3-site-a',
  kind: 'TRAIN',
  round: 3,
  modelHash: 'a'.repeat(64),
  modelSize: 1234,
  deadlineUnixMs: 1_700_000_000_000,
  settingsJson: '{"federation":"fed"}',
};

describe('keyTaskSigner', () => {
  const key = generateCoordinatorKey();
  const sign = keyTaskSigner(key.privateKeyPem);

  it('returns the manifest as given, with a signature the site verifies against the coordinator key', () => {
    const { signature, ...sent } = sign(manifest);
    expect(sent).toEqual(manifest);
    expect(verifyManifest(key.publicKeyRaw, manifestBytes(sent), signature)).toBe(true);
  });

  it('gives a signature that no longer verifies once the manifest is changed, or under another key', () => {
    const { signature, ...sent } = sign(manifest);
    expect(verifyManifest(key.publicKeyRaw, manifestBytes({ ...sent, modelSize: 64 * 1024 ** 3 }), signature)).toBe(false);
    expect(verifyManifest(generateCoordinatorKey().publicKeyRaw, manifestBytes(sent), signature)).toBe(false);
  });
});
