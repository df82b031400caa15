/**
 * Loaded into the coordinator by `npm run bench:sites` (node --import): once a second it appends the process's
 * memory breakdown to the file named by MEDFL_BENCH_PROBE_FILE, one JSON line per sample, so the bench can say where
 * the coordinator's memory goes (V8 heap, Buffers and other external memory, and the native rest: TLS, HTTP/2, malloc)
 * and how it grows with the connected sites. Bench-only: the coordinator itself has no such switch.
 */
import { appendFileSync } from 'node:fs';

const file = process.env.MEDFL_BENCH_PROBE_FILE;
if (file) {
  const sample = () => {
    const m = process.memoryUsage();
    const resources = {};
    for (const r of process.getActiveResourcesInfo()) resources[r] = (resources[r] ?? 0) + 1;
    appendFileSync(file, `${JSON.stringify({ t: Date.now(), rss: m.rss, heapTotal: m.heapTotal, heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers, tls: resources.TLSWRAP ?? 0 })}\n`);
  };
  setInterval(sample, 1000).unref();
}
