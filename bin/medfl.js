#!/usr/bin/env node
// Runs the TypeScript CLI directly (tsx's loader), so there is no build step between a checkout and `medfl`.
import { nodeVersionProblem } from './node-version.js';

const problem = nodeVersionProblem(process.version);
if (problem) {
  process.stderr.write(`${problem}\n`);
  process.exit(1);
}
const { register } = await import('tsx/esm/api');
register();
await import('../cli/medfl.ts');
