/**
 * A real nats-server (Debian package `nats-server`) on a free loopback port, with JetStream in a temp dir.
 * The test command installs the package; if it is missing the test fails with that fix, it never skips.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from '../../cli/processes.ts';

export interface NatsServer {
  url: string;
  port: number;
  process: ChildProcess;
  stop(): Promise<void>;
}

export async function startNats(opts: { jetstream?: boolean; port?: number; storeDir?: string } = {}): Promise<NatsServer> {
  const port = opts.port ?? (await freePort());
  const args = ['-a', '127.0.0.1', '-p', String(port)];
  if (opts.jetstream ?? true) args.push('-js', '-sd', opts.storeDir ?? mkdtempSync(join(tmpdir(), 'medfl-nats-')));
  const proc = spawn('nats-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`nats-server did not report ready within 10 s:\n${output}`)), 10_000);
    const onData = (d: Buffer) => {
      output += d.toString();
      if (output.includes('Server is ready')) {
        clearTimeout(timer);
        resolve();
      }
    };
    proc.stdout!.on('data', onData);
    proc.stderr!.on('data', onData);
    proc.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot start nats-server (${e.message}); install it with \`apt-get install -y nats-server\` (the test command does this)`));
    });
  });
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    process: proc,
    stop: () =>
      new Promise<void>((resolve) => {
        if (proc.exitCode !== null || proc.signalCode !== null) return resolve();
        proc.once('exit', () => resolve());
        proc.kill('SIGKILL');
      }),
  };
}
