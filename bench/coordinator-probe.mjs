/**
 * Loaded into the coordinator by `npm run bench:sites` (node --import): once a second it appends the process's
 * memory breakdown to the file named by MEDFL_BENCH_PROBE_FILE, one JSON line per sample, so the bench can say where
 * the coordinator's memory goes (V8 heap, Buffers and other external memory, and the native rest: TLS, HTTP/2, malloc)
 * and how it grows with the connected sites, with the number of full garbage collections so far. Bench-only: the
 * coordinator itself has no such switch.
 */
import { appendFileSync } from 'node:fs';
import { constants, PerformanceObserver } from 'node:perf_hooks';

const file = process.env.MEDFL_BENCH_PROBE_FILE;
if (file) {
  let fullGcs = 0;
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if (e.detail?.kind === constants.NODE_PERFORMANCE_GC_MAJOR) fullGcs++;
  }).observe({ entryTypes: ['gc'] });
  const sample = () => {
    const m = process.memoryUsage();
    appendFileSync(file, `${JSON.stringify({ t: Date.now(), rss: m.rss, heapTotal: m.heapTotal, heapUsed: m.heapUsed, external: m.external, arrayBuffers: m.arrayBuffers, fullGcs })}\n`);
  };
  setInterval(sample, 1000).unref();
}

/**
 * MEDFL_BENCH_CPU_PROFILE=FILE: a CPU profile of the coordinator from start to exit (--cpu-prof may not be given
 * in NODE_OPTIONS). The main thread's inspector session answers synchronously, so the profile is written in 'exit'.
 */
const profileFile = process.env.MEDFL_BENCH_CPU_PROFILE;
if (profileFile) {
  const { Session } = await import('node:inspector');
  const { writeFileSync } = await import('node:fs');
  const session = new Session();
  session.connect();
  session.post('Profiler.enable');
  session.post('Profiler.start');
  process.on('exit', () => {
    session.post('Profiler.stop', (err, result) => {
      if (!err) writeFileSync(profileFile, JSON.stringify(result.profile));
    });
  });
}
