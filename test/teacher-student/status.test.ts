/** `medfl status` shows per-class validation Dice per round and site, the teacher generation, and the current teacher. */
import { describe, expect, it } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { metricsTable, statusReport } from '../../cli/status.ts';
import { CoordinatorStore, type MetricRow } from '../../coordinator/store/store.ts';
import { TEACHER_KEY } from '../../coordinator/rounds/teacher.ts';

const rows = (round: number, site: string, v: Record<string, number>): MetricRow[] => Object.entries(v).map(([key, value]) => ({ round, site, key, value }));

describe('status tables', () => {
  it('has a column per class when sites report several, and the teacher generation of each round', () => {
    const m = [
      ...rows(1, 'site-a', { num_train: 4, train_loss: 0.4, train_loss_first: 0.7, val_dice_mean: 0.5, val_dice_class_1: 0.8, val_dice_class_2: 0.2, train_seconds: 1 }),
      ...rows(2, 'site-a', { num_train: 4, train_loss: 0.3, train_loss_first: 0.5, val_dice_mean: 0.6, val_dice_class_1: 0.85, val_dice_class_2: 0.35, teacher_generation: 1, pseudo_cases: 3, train_seconds: 1 }),
    ];
    const t = metricsTable(m);
    expect(t).toContain('Dice c1');
    expect(t).toContain('Dice c2');
    expect(t).toContain('0.350');
    expect(t).toContain('g1 (3 pseudo)');
  });

  it('keeps the one-class table as it was (mean only, no teacher column)', () => {
    const t = metricsTable(rows(1, 'site-a', { num_train: 4, val_dice_mean: 0.5, val_dice_class_1: 0.5 }));
    expect(t).not.toContain('Dice c1');
    expect(t).not.toContain('teacher');
  });

  it('names the current teacher', () => {
    const store = new CoordinatorStore(join(mkdtempSync(join(tmpdir(), 'medfl-status-')), 'state.db'));
    store.setMeta(TEACHER_KEY, JSON.stringify({ modelHash: 'ab'.repeat(32), generation: 2, round: 4 }));
    expect(statusReport(store, 'fed')).toContain('teacher: generation 2, model abababababab… (the aggregate of round 4)');
    store.close();
  });
});
