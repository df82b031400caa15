#!/usr/bin/env node
// Runs the TypeScript CLI directly (tsx's loader), so there is no build step between a checkout and `medfl`.
import { register } from 'tsx/esm/api';

register();
await import('../cli/medfl.ts');
