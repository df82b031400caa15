/**
 * The plan of the transport tests: one tiny3d model whose `width` sets the size of what crosses the wire (width 40:
 * about a megabyte; 160: ~17 MB), one local step, rounds that neither time out nor wait for a gathering, so each
 * test decides by its own calls when a transfer happens.
 */
export const transferPlan = (o: { name: string; width: number; minSites: number; rounds?: number }): string =>
  [
    `name: ${o.name}`,
    `model: { architecture: tiny3d, patch: [16, 16, 16], numClasses: 2, width: ${o.width}, seed: 3 }`,
    `rounds: ${o.rounds ?? 1}`,
    `minSites: ${o.minSites}`,
    'roundDeadlineSeconds: 600',
    'waitForSitesSeconds: 600',
    'gatherSeconds: 0',
    'local: { steps: 1, batchSize: 2, learningRate: 0.005 }',
    'share: { parts: [encoder] }',
    '',
  ].join('\n');
