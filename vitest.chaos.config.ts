import { defineConfig } from 'vitest/config';
import base from './vitest.config.ts';

// The longer chaos runs (npm run chaos, npm run chaos:short; docs/faults.md): the default suite's settings, their own
// files only. The default suite runs the short one, test/chaos/faults.test.ts.
export default defineConfig({ ...base, test: { ...base.test, include: ['test/chaos/**/*.chaos.ts'] } });
