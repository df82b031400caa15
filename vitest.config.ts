import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    // Two cores: end-to-end tests start several processes each; running many files at once only thrashes.
    maxWorkers: 2,
    // Quiet in-process loggers (createLogger reads MEDFL_LOG_LEVEL); tests that read logs set their own level.
    env: { MEDFL_LOG_LEVEL: process.env.MEDFL_LOG_LEVEL ?? 'warn' },
  },
});
