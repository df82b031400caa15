/**
 * The pseudo-label confidence threshold chosen on validation: the lowest grid threshold at which the teacher's
 * confident foreground is right often enough, per foreground class.
 */
import { describe, expect, it } from 'vitest';
import { calibrateConfidence, CONFIDENCE_GRID } from '../../site-agent/training/confidence-calibration.ts';

/** Two-class voxels: [p(foreground), true label]. */
function twoClass(voxels: readonly [number, number][]) {
  const probs = new Float32Array(voxels.length * 2);
  const label = new Uint8Array(voxels.length);
  voxels.forEach(([p, l], v) => { probs[2 * v] = 1 - p; probs[2 * v + 1] = p; label[v] = l; });
  return { probs, label };
}

describe('confidence calibrated on validation', () => {
  it('picks the lowest threshold whose confident foreground reaches the target precision', () => {
    // Foreground predictions: at 0.55 and 0.65 wrong, at 0.75 and above right; background all right.
    const c = twoClass([[0.55, 0], [0.65, 0], [0.75, 1], [0.88, 1], [0.97, 1], [0.1, 0], [0.2, 0]]);
    // At 0.5: 3 of 5 right (0.6); 0.6: 3 of 4; 0.7: 3 of 3.
    expect(calibrateConfidence([c], 2, 0.6)).toMatchObject({ confidence: 0.5, reached: true });
    expect(calibrateConfidence([c], 2, 0.7)).toMatchObject({ confidence: 0.6, reached: true, precision: [0.75] });
    const strict = calibrateConfidence([c], 2, 1);
    expect(strict).toMatchObject({ confidence: 0.7, reached: true, precision: [1] });
    // Kept: at 0.7 the three right foreground voxels and the two background voxels (max probability 0.9, 0.8).
    expect(strict.keptFraction).toBeCloseTo(5 / 7, 10);
  });

  it('pools the validation cases before judging, and uses the highest threshold when none reaches the target', () => {
    const a = twoClass([[0.995, 0], [0.995, 0], [0.995, 1]]);
    const r = calibrateConfidence([a], 2, 0.9);
    expect(r).toMatchObject({ confidence: CONFIDENCE_GRID[CONFIDENCE_GRID.length - 1], reached: false });
    expect(r.precision[0]).toBeCloseTo(1 / 3, 6);
    const b = twoClass([[0.995, 1], [0.995, 1], [0.995, 1], [0.995, 1], [0.995, 1], [0.995, 1], [0.995, 1]]);
    // Together 8 of 10 right at every threshold.
    expect(calibrateConfidence([a, b], 2, 0.8)).toMatchObject({ confidence: 0.5, reached: true, precision: [0.8] });
  });

  it('holds every foreground class to the target, and a class never predicted constrains nothing', () => {
    // Three classes: class 1 wrong at 0.6, right at 0.92; class 2 never predicted.
    const probs = Float32Array.from([0.3, 0.6, 0.1, 0.05, 0.92, 0.03, 0.8, 0.1, 0.1]);
    const label = Uint8Array.from([0, 1, 0]);
    const r = calibrateConfidence([{ probs, label }], 3, 0.9);
    expect(r.confidence).toBe(0.7);
    expect(r.precision[0]).toBe(1);
    expect(Number.isNaN(r.precision[1])).toBe(true);
  });

  it('refuses to calibrate without validation cases or with mismatched sizes', () => {
    expect(() => calibrateConfidence([], 2, 0.9)).toThrow(/validation case/);
    expect(() => calibrateConfidence([{ probs: new Float32Array(3), label: new Uint8Array(2) }], 2, 0.9)).toThrow(/3 probabilities for 2 voxels/);
  });
});
