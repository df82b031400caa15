/**
 * A site that dies mid-upload: it takes its TRAIN task, starts an upload of a well-formed update,
 * sends the header and the first part of the bytes, prints PARTIAL_SENT, and waits to be killed.
 * Usage: node --import tsx test/support/partial-uploader.ts SITE_DIR
 */
import { SiteHome } from '../../site-agent/home.ts';
import { FederationClient, type WireTask } from '../../site-agent/transport/client.ts';
import { TaskSettingsSchema } from '../../shared/protocol/task.ts';
import { architectureFor } from '../../shared/model/registry.ts';
import { pick } from '../../shared/model/sharing.ts';
import { encodeSafetensors } from '../../shared/tensors/safetensors.ts';
import { sha256Hex } from '../../shared/util/hash.ts';

const home = new SiteHome(process.argv[2]);
const client = new FederationClient(home);
const stream = client.subscribeTasks([]);
stream.on('data', (t: WireTask) => {
  if (t.kind !== 'TRAIN') return;
  const settings = TaskSettingsSchema.parse(JSON.parse(t.settingsJson));
  const arch = architectureFor(settings.model);
  const payload = encodeSafetensors(pick(arch.init(99), settings.sharedTensors.map((name) => ({ name }))));
  const up = client.openUpload(600_000);
  up.ack.catch(() => undefined);
  void (async () => {
    await up.send({ header: { updateId: `partial-${Date.now()}`, round: t.round, taskId: t.taskId, baseModelHash: t.modelHash, totalSize: payload.length, sha256: sha256Hex(payload), numSamples: 4 } });
    await up.sendData(0, payload.subarray(0, Math.floor(payload.length / 2)));
    process.stdout.write('PARTIAL_SENT\n');
  })();
});
stream.on('error', () => undefined);
