/** Test helper: every chunk of one DownloadModel call through a site's own client, in order. */
import type { FederationClient, WireChunk } from '../../site-agent/transport/client.ts';

export function downloadChunks(client: FederationClient, modelHash: string, offset = 0): Promise<WireChunk[]> {
  return new Promise((resolve, reject) => {
    const chunks: WireChunk[] = [];
    const s = client.downloadModel(modelHash, offset);
    s.on('data', (c: WireChunk) => chunks.push(c));
    s.on('end', () => resolve(chunks));
    s.on('error', reject);
  });
}

/** The downloaded bytes from `offset` on. */
export async function downloadBytes(client: FederationClient, modelHash: string, offset = 0): Promise<Buffer> {
  return Buffer.concat((await downloadChunks(client, modelHash, offset)).map((c) => c.data));
}
