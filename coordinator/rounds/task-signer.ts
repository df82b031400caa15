/**
 * Signs what the coordinator sends a site: a task's manifest goes in, the message with a signature over the manifest's
 * bytes comes out. Sites check that signature against the coordinator key they pinned at enrolment, so every task the
 * coordinator sends passes through here, TRAIN and FINISHED alike.
 *
 * The coordinator's default signs with its own Ed25519 key (`keyTaskSigner`). Another signer is passed where the key
 * or the decision to sign lives elsewhere: a signing service that records or vets each manifest, or a test that plays
 * a coordinator holding the real key but sending tasks of its own making.
 */
import { signManifest, type PrivateKeyInput } from '../../shared/security/site-identity.ts';
import { manifestBytes, type TaskManifest } from '../../shared/protocol/task.ts';
import type { TaskMessage } from './site-connections.ts';

export type TaskSigner = (manifest: TaskManifest) => TaskMessage;

/** A signed task: the manifest and `sign`'s signature over its bytes. */
export function signedTask(manifest: TaskManifest, sign: (bytes: Buffer) => Buffer): TaskMessage {
  return { ...manifest, signature: sign(manifestBytes(manifest)) };
}

/** Signs each manifest as it is, with the coordinator's Ed25519 signing key. */
export function keyTaskSigner(signingKey: PrivateKeyInput): TaskSigner {
  return (manifest) => signedTask(manifest, (bytes) => signManifest(signingKey, bytes));
}
