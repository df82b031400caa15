/**
 * Starting `medfl` sub-commands as separate processes (the demo and the end-to-end tests run a
 * federation exactly as admins would: one process per coordinator and per site).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { createServer } from 'node:net';
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const MEDFL_BIN = resolve(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'medfl.js');

export async function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
  });
}

export function spawnMedfl(args: string[], logPath: string, env: NodeJS.ProcessEnv = {}): ChildProcess {
  const log = createWriteStream(logPath, { flags: 'a' });
  const child = spawn(process.execPath, [MEDFL_BIN, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.pipe(log, { end: false });
  child.stderr!.pipe(log, { end: false });
  return child;
}

export function runToEnd(args: string[], logPath: string): Promise<void> {
  return new Promise((res, rej) => {
    const child = spawnMedfl(args, logPath);
    child.once('exit', (code) => (code === 0 ? res() : rej(new Error(`medfl ${args.slice(0, 2).join(' ')} exited with ${code}; see ${logPath}`))));
  });
}

export async function waitFor(cond: () => boolean, timeoutMs: number, what: string, intervalMs = 100): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

