/**
 * The docs check (scripts/check-docs.ts): the repository's Markdown names only files it has, and the check itself
 * reports each kind of stale reference on a small repository made for the purpose.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkDocs, headingAnchor } from '../../scripts/check-docs.ts';

const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

function repoWith(files: Record<string, string>, git = true): string {
  const dir = mkdtempSync(join(tmpdir(), 'medfl-docs-'));
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, path)), { recursive: true });
    writeFileSync(join(dir, path), text);
  }
  if (git) {
    execFileSync('git', ['init', '-q'], { cwd: dir });
    execFileSync('git', ['add', '.'], { cwd: dir });
  }
  return dir;
}

describe('docs check', () => {
  it("finds nothing stale in the repository's Markdown", () => {
    expect(checkDocs(REPO)).toEqual([]);
  });

  it('makes anchors as GitHub does', () => {
    expect(headingAnchor('`bench:wan`')).toBe('benchwan');
    expect(headingAnchor('What crosses the wire — and what never does')).toBe('what-crosses-the-wire--and-what-never-does');
  });

  it('reads the files from the folder outside a git checkout (an unpacked release)', () => {
    const dir = repoWith({ 'src/a.ts': '', 'docs/x.md': 'See [a](../src/a.ts), `src/a.ts` and [b](../src/b.ts).\n' }, false);
    try {
      expect(checkDocs(dir)).toEqual(['docs/x.md:1: link to a file that is not in the repository: ../src/b.ts']);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reports missing files, missing headings, unknown source paths (backticked or in text) and citations from outside', () => {
    const dir = repoWith({
      'src/engine/pool.ts': 'export {};\n',
      'docs/guide.md': '# Guide\n\n## Pools and `buffers`\n',
      'docs/x.md': [
        'Good: [guide](guide.md), [pools](guide.md#pools-and-buffers), [code](../src/engine/pool.ts), `engine/pool.ts`, `pool.ts`.',
        'Patterns are skipped: `round-N.f32`, `<sha>.safetensors`, `dataset.json`.',
        'Broken: [gone](../src/gone.ts) and [heading](guide.md#nope).',
        'Renamed: `src/engine/old-pool.ts`.',
        'Outside: see ../shared/notes/methods.md.',
        'Escapes: [up](../../elsewhere.md).',
        'In running text: src/engine/pool.ts is here, src/engine/lost.ts is not, https://example.org/a/b.ts is a URL.',
      ].join('\n'),
    });
    try {
      expect(checkDocs(dir)).toEqual([
        'docs/x.md:3: link to a file that is not in the repository: ../src/gone.ts',
        'docs/x.md:3: link to a heading that docs/guide.md does not have: guide.md#nope',
        'docs/x.md:4: names a file that is not in the repository: `src/engine/old-pool.ts`',
        expect.stringMatching(/^docs\/x\.md:5: cites something outside the repository/),
        expect.stringMatching(/^docs\/x\.md:5: cites something outside the repository/),
        'docs/x.md:5: names a file that is not in the repository: `../shared/notes/methods.md`',
        'docs/x.md:6: link leaves the repository: ../../elsewhere.md',
        'docs/x.md:7: names a file that is not in the repository: `src/engine/lost.ts`',
      ]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
