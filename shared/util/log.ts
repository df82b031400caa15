/**
 * Structured logs (pino) for every process. Rule: never log a patient path or voxel value at info level;
 * site code that must mention a file does so at debug, and names the case by index at info.
 */
import { pino, type Logger } from 'pino';

export type { Logger } from 'pino';

export function createLogger(component: string, extra: Record<string, unknown> = {}): Logger {
  const level = process.env.MEDFL_LOG_LEVEL ?? 'info';
  return pino({ level, base: { component, pid: process.pid, ...extra } }, pino.destination({ fd: 2, sync: true }));
}
