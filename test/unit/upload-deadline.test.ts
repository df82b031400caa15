import { describe, expect, it } from 'vitest';
import { uploadDeadlineMs } from '../../site-agent/transport/upload.ts';

describe('upload deadline', () => {
  it('is 10 minutes for updates a 1 Mbit/s uplink sends in well under that', () => {
    expect(uploadDeadlineMs(1_000)).toBe(600_000);
    expect(uploadDeadlineMs(40e6)).toBe(600_000); // 320 s at 1 Mbit/s, ×1.5 = 480 s
  });

  it('grows with the update, so a slow uplink can still finish one (130 MB: 1,560 s)', () => {
    expect(uploadDeadlineMs(130e6)).toBe(1_560_000);
    expect(uploadDeadlineMs(260e6)).toBe(2 * uploadDeadlineMs(130e6));
  });
});
