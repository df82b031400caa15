/**
 * What `medfl experiment` shows and writes: the per-seed runs reduced to mean ± sd over seeds, as tables
 * (cli-table3), an SVG of Dice against rounds with a ±sd band, and the summary rows of results.json.
 */
import Table from 'cli-table3';

export const ARMS = ['local-only', 'federated', 'teacher-student', 'pooled', 'threshold'] as const;
export type Arm = (typeof ARMS)[number];
export const INITS = ['scratch', 'pretrained', 'federated-ssl'] as const;
/** scratch; pretrained (an encoder file); federated-ssl (the plan's self-supervised pretraining stage, run first on the sites' scans). */
export type InitKind = (typeof INITS)[number];

/** One arm × init × seed. */
export interface ArmRun {
  arm: Arm;
  /** 'none' for the threshold baseline (nothing is trained). */
  init: InitKind | 'none';
  seed: number;
  /** site → test Dice (mean over foreground classes) per round, index 0 = round 1. */
  dice: Record<string, number[]>;
  /** site → validation Dice of the same model per round (NaN where a site has no validation case). */
  val: Record<string, number[]>;
  /** Mean test Dice over sites per round. */
  mean: number[];
  /** Mean validation Dice over sites per round (NaN when no site has validation cases). */
  valMean: number[];
  seconds: number;
  /** Teacher–student: each promoted generation against the students it taught (Noisy Student's claim, per generation). */
  generations?: GenerationReport[];
  /** Teacher–student: per round with a teacher, where pseudo-labels were used and the teacher against the received model. */
  pseudoLabels?: PseudoLabelRound[];
}

/**
 * One round of a teacher–student run as the sites reported it (metrics pseudo_used, teacher_val_dice,
 * model_val_dice): how many sites learnt from pseudo-labels, and the teacher's and the received model's validation
 * Dice, each a mean over the sites that measured it (NaN where none did).
 */
export interface PseudoLabelRound {
  round: number;
  sitesWithTeacher: number;
  sitesUsed: number;
  teacherVal: number;
  modelVal: number;
  /** Sites that withheld pseudo-labels because the generation in use was retired there (its students did not beat it). */
  sitesRetired: number;
  /** Each site with a teacher: whether it used pseudo-labels, and the two scores it compared (NaN = not measured). */
  bySite: Record<string, { used: boolean; teacherVal: number; modelVal: number }>;
}

/** The round's record from each site's metrics (by site name), or undefined when no task of the round named a teacher. */
export function pseudoLabelRound(round: number, siteMetrics: Readonly<Record<string, Readonly<Record<string, number>>>>): PseudoLabelRound | undefined {
  const sites = Object.entries(siteMetrics).filter(([, m]) => m.pseudo_used !== undefined);
  const withTeacher = sites.map(([, m]) => m);
  if (withTeacher.length === 0) return undefined;
  const mean = (key: string) => {
    const v = withTeacher.map((m) => m[key]).filter((x): x is number => x !== undefined && Number.isFinite(x));
    return v.length ? v.reduce((a, x) => a + x, 0) / v.length : Number.NaN;
  };
  const bySite = Object.fromEntries(sites.map(([site, m]) => [site, { used: m.pseudo_used === 1, teacherVal: m.teacher_val_dice ?? Number.NaN, modelVal: m.model_val_dice ?? Number.NaN }]));
  return { round, sitesWithTeacher: withTeacher.length, sitesUsed: withTeacher.filter((m) => m.pseudo_used === 1).length, sitesRetired: withTeacher.filter((m) => m.teacher_retired === 1).length, teacherVal: mean('teacher_val_dice'), modelVal: mean('model_val_dice'), bySite };
}

/** "pseudo-labels at 1/3 sites (validation: teacher 0.412, received model 0.455)" */
export function describePseudoLabelRound(p: PseudoLabelRound): string {
  const f = (x: number) => (Number.isFinite(x) ? x.toFixed(3) : '—');
  const retired = p.sitesRetired > 0 ? `, generation retired at ${p.sitesRetired}` : '';
  return `pseudo-labels at ${p.sitesUsed}/${p.sitesWithTeacher} sites${retired} (validation: teacher ${f(p.teacherVal)}, received model ${f(p.modelVal)})`;
}

/**
 * A teacher generation (the aggregate after `promotedAfterRound`) and the last student it taught (the aggregate of
 * the round before the next promotion, or the final round). Sites may have kept an earlier generation instead
 * (teacher-choice.ts); `usedBySites` counts the site-rounds that trained with this one.
 */
export interface GenerationReport {
  generation: number;
  promotedAfterRound: number;
  teacherTest: number;
  teacherVal: number;
  studentRound: number;
  studentTest: number;
  studentVal: number;
  usedBySites: number;
}

/** The generation rows of one teacher–student run (test and validation Dice are means over sites). */
export function generationReports(promotions: readonly { generation: number; round: number }[], mean: readonly number[], valMean: readonly number[], used: ReadonlyMap<number, number>): GenerationReport[] {
  return promotions.map((p, i) => {
    const studentRound = i + 1 < promotions.length ? promotions[i + 1].round : mean.length;
    return {
      generation: p.generation,
      promotedAfterRound: p.round,
      teacherTest: mean[p.round - 1],
      teacherVal: valMean[p.round - 1],
      studentRound,
      studentTest: mean[studentRound - 1],
      studentVal: valMean[studentRound - 1],
      usedBySites: used.get(p.generation) ?? 0,
    };
  });
}

/** One row of results.json's `summary`: final-round test Dice (mean over sites), mean ± sd over seeds. */
export interface SummaryRow {
  arm: Arm;
  init: InitKind | 'none';
  /** Mean over seeds of the mean over sites of the final-round test Dice. */
  meanDice: number;
  sdDice: number;
  seeds: number[];
  /** Per seed: the final-round value, the best round's, and the test Dice of the round validation picks. */
  finalDice: number[];
  bestDice: number[];
  /** Test Dice at the round with the best mean validation Dice (NaN without validation cases). */
  selectedDice: number[];
  /** Best − final, worst seed: how much the last round lost against the best one. */
  maxFinalDrop: number;
  /** Mean wall seconds per seed. */
  seconds: number;
}

export function meanSd(xs: readonly number[]): { mean: number; sd: number } {
  const v = xs.filter(Number.isFinite);
  if (v.length === 0) return { mean: Number.NaN, sd: Number.NaN };
  const mean = v.reduce((a, x) => a + x, 0) / v.length;
  // Sample sd (n − 1): the spread a new seed would show; 0 for a single seed.
  const sd = v.length > 1 ? Math.sqrt(v.reduce((a, x) => a + (x - mean) ** 2, 0) / (v.length - 1)) : 0;
  return { mean, sd };
}

const argmax = (xs: readonly number[]): number => {
  let best = -1;
  for (let i = 0; i < xs.length; i++) if (Number.isFinite(xs[i]) && (best < 0 || xs[i] > xs[best])) best = i;
  return best;
};

export function summarise(runs: readonly ArmRun[]): SummaryRow[] {
  const keys = [...new Set(runs.map((r) => `${r.arm}\u0000${r.init}`))];
  return keys.map((k) => {
    const group = runs.filter((r) => `${r.arm}\u0000${r.init}` === k);
    const finalDice = group.map((r) => r.mean[r.mean.length - 1]);
    const bestDice = group.map((r) => Math.max(...r.mean));
    const selectedDice = group.map((r) => {
      const i = argmax(r.valMean);
      return i < 0 ? Number.NaN : r.mean[i];
    });
    const { mean, sd } = meanSd(finalDice);
    return {
      arm: group[0].arm,
      init: group[0].init,
      meanDice: mean,
      sdDice: sd,
      seeds: group.map((r) => r.seed),
      finalDice,
      bestDice,
      selectedDice,
      maxFinalDrop: Math.max(...group.map((r, i) => bestDice[i] - finalDice[i])),
      seconds: group.reduce((a, r) => a + r.seconds, 0) / group.length,
    };
  });
}

const style = () => (process.stdout.isTTY ? {} : { style: { head: [], border: [] } });
const pm = (m: number, s: number) => (Number.isFinite(m) ? `${m.toFixed(3)} ± ${s.toFixed(3)}` : '—');

/** Mean test Dice over sites per arm, init and round, mean ± sd over seeds. */
export function roundsTable(runs: readonly ArmRun[]): string {
  const rounds = Math.max(...runs.map((r) => r.mean.length));
  const t = new Table({ head: ['arm', 'init', ...Array.from({ length: rounds }, (_, r) => `r${r + 1}`)], ...style() });
  for (const s of summarise(runs)) {
    const group = runs.filter((r) => r.arm === s.arm && r.init === s.init);
    t.push([s.arm, s.init, ...Array.from({ length: rounds }, (_, r) => {
      const v = meanSd(group.map((g) => g.mean[r] ?? Number.NaN));
      return pm(v.mean, v.sd);
    })]);
  }
  return t.toString();
}

/** Test Dice per site at the final round, mean ± sd over seeds. */
export function sitesTable(runs: readonly ArmRun[]): string {
  const sites = [...new Set(runs.flatMap((r) => Object.keys(r.dice)))];
  const t = new Table({ head: ['arm', 'init', ...sites], ...style() });
  for (const s of summarise(runs)) {
    const group = runs.filter((r) => r.arm === s.arm && r.init === s.init);
    t.push([s.arm, s.init, ...sites.map((site) => {
      const v = group.map((g) => g.dice[site]?.[g.dice[site].length - 1]).filter((x): x is number => x !== undefined);
      if (v.length === 0) return '';
      const m = meanSd(v);
      return pm(m.mean, m.sd);
    })]);
  }
  return t.toString();
}

/** The headline: final-round Dice, best round, the round validation picks, drop, time. */
export function summaryTable(rows: readonly SummaryRow[]): string {
  const t = new Table({ head: ['arm', 'init', 'final Dice (mean ± sd)', 'best round', 'picked by validation', 'best − final (worst seed)', 'seeds', 's / seed'], ...style() });
  for (const r of rows) {
    const best = meanSd(r.bestDice);
    const sel = meanSd(r.selectedDice);
    t.push([r.arm, r.init, pm(r.meanDice, r.sdDice), pm(best.mean, best.sd), pm(sel.mean, sel.sd), r.maxFinalDrop.toFixed(3), r.seeds.join(','), r.seconds.toFixed(0)]);
  }
  return t.toString();
}

const COLOURS: Record<Arm, string> = { 'local-only': '#d62728', federated: '#1f77b4', 'teacher-student': '#2ca02c', pooled: '#7f7f7f', threshold: '#9467bd' };

/** Mean test Dice against rounds: one line per arm and init (dashed = scratch), a ±sd band over seeds, axes, legend. */
export function diceSvg(runs: readonly ArmRun[]): string {
  const rounds = Math.max(1, ...runs.map((r) => r.mean.length));
  const W = 760, H = 420, L = 60, R = 240, T = 30, B = 50;
  const pw = W - L - R, ph = H - T - B;
  const x = (r: number) => L + (rounds === 1 ? pw / 2 : ((r - 1) / (rounds - 1)) * pw);
  const y = (d: number) => T + (1 - Math.max(0, Math.min(1, d))) * ph;
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L + pw / 2}" y="18" text-anchor="middle" font-size="14">Test Dice (mean over sites; band: ± sd over seeds) against rounds</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const d = i / 5;
    parts.push(`<line x1="${L}" y1="${y(d)}" x2="${L + pw}" y2="${y(d)}" stroke="#e0e0e0"/>`, `<text x="${L - 8}" y="${y(d) + 4}" text-anchor="end">${d.toFixed(1)}</text>`);
  }
  for (let r = 1; r <= rounds; r++) parts.push(`<text x="${x(r)}" y="${T + ph + 18}" text-anchor="middle">${r}</text>`);
  parts.push(
    `<line x1="${L}" y1="${T}" x2="${L}" y2="${T + ph}" stroke="black"/>`,
    `<line x1="${L}" y1="${T + ph}" x2="${L + pw}" y2="${T + ph}" stroke="black"/>`,
    `<text x="${L + pw / 2}" y="${H - 10}" text-anchor="middle">round</text>`,
    `<text x="16" y="${T + ph / 2}" text-anchor="middle" transform="rotate(-90 16 ${T + ph / 2})">Dice</text>`,
  );
  summarise(runs).forEach((s, i) => {
    const group = runs.filter((r) => r.arm === s.arm && r.init === s.init);
    const n = Math.max(...group.map((g) => g.mean.length));
    const stats = Array.from({ length: n }, (_, r) => meanSd(group.map((g) => g.mean[r] ?? Number.NaN)));
    const colour = COLOURS[s.arm];
    const dash = s.init === 'scratch' ? ' stroke-dasharray="6 4"' : '';
    // A one-round arm (the threshold baseline) is a horizontal line across the plot.
    const xs = n === 1 ? [1, rounds] : stats.map((_, r) => r + 1);
    const ms = n === 1 ? [stats[0], stats[0]] : stats;
    if (group.length > 1) {
      const upper = ms.map((m, k) => `${x(xs[k]).toFixed(1)},${y(m.mean + m.sd).toFixed(1)}`);
      const lower = ms.map((m, k) => `${x(xs[k]).toFixed(1)},${y(m.mean - m.sd).toFixed(1)}`).reverse();
      parts.push(`<polygon fill="${colour}" fill-opacity="0.12" stroke="none" points="${[...upper, ...lower].join(' ')}"/>`);
    }
    parts.push(`<polyline fill="none" stroke="${colour}" stroke-width="2"${dash} points="${ms.map((m, k) => `${x(xs[k]).toFixed(1)},${y(m.mean).toFixed(1)}`).join(' ')}"/>`);
    const ly = T + 10 + i * 20;
    parts.push(
      `<line x1="${L + pw + 15}" y1="${ly}" x2="${L + pw + 45}" y2="${ly}" stroke="${colour}" stroke-width="2"${dash}/>`,
      `<text x="${L + pw + 52}" y="${ly + 4}">${escapeXml(`${s.arm}${s.init === 'none' ? '' : ` (${s.init})`} ${pm(s.meanDice, s.sdDice)}`)}</text>`,
    );
  });
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}

const escapeXml = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
