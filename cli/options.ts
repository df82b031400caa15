/**
 * Parsers for numeric command-line options. Each checks the value where commander reads it, so a typo gets a
 * message naming the option, the accepted range and what was given, instead of a NaN that fails much later
 * (a SQLite constraint, "listen on 0.0.0.0:NaN").
 */
import { InvalidArgumentError } from 'commander';

function invalid(flag: string, expected: string, got: string): InvalidArgumentError {
  return new InvalidArgumentError(`${flag} must be ${expected}, got ${JSON.stringify(got)}`);
}

/** A whole number in [min, max], digits only: "1e3", "3.5", "0x10" and "" are refused rather than coerced. */
export function integerOption(flag: string, min: number, max: number, unit = ''): (value: string) => number {
  const expected = `an integer from ${min} to ${max}${unit ? ` (${unit})` : ''}`;
  return (value) => {
    const n = /^\d+$/.test(value.trim()) ? Number(value.trim()) : NaN;
    if (!Number.isSafeInteger(n) || n < min || n > max) throw invalid(flag, expected, value);
    return n;
  };
}

/** A finite number above 0 and at most max (fractions allowed: `--ttl 0.5` is half an hour). */
export function positiveNumberOption(flag: string, max: number, unit = ''): (value: string) => number {
  const expected = `a positive number${unit ? ` of ${unit}` : ''} (at most ${max})`;
  return (value) => {
    const n = value.trim() === '' ? NaN : Number(value);
    if (!Number.isFinite(n) || n <= 0 || n > max) throw invalid(flag, expected, value);
    return n;
  };
}

export const MAX_PORT = 65_535;
