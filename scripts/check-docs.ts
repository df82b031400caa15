/**
 * Checks the repository's Markdown against the tree it describes, so that a doc cannot quietly point at a file that
 * was renamed or deleted, or at notes kept outside the repository:
 *   1. every relative link `[text](path#anchor)` resolves to a tracked file or folder, and its anchor to a heading;
 *   2. every backticked source path (`coordinator/rounds/round-engine.ts`, `graph/pool.ts`, `layout.ts`), and every
 *      path with a folder in running text (docs/data.md), names a tracked file: by its path from the root or from the
 *      doc's folder, by a path suffix, or, for a bare name, by file name;
 *   3. no line cites files outside the repository.
 *
 *   node --import tsx scripts/check-docs.ts [--root DIR] [file.md …]   (default: every tracked .md file)
 * Prints one line per problem and exits 1 when there is any.
 */
import { execFileSync } from 'node:child_process';
import { type Dirent, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, normalize, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Extensions of files that belong in the repository; runtime files (dataset.json, coordinator.json) do not. */
const SOURCE_PATH = /^[\w.@/-]+\.(ts|mts|mjs|js|py|cc|cpp|h|cu|proto|sh|md|gyp|jsonc)$/;
/** Marks a backticked path as a pattern rather than a file: `round-N.f32`, `<sha256>.safetensors`, `…`, `-kernel.ts`. */
const PLACEHOLDER = /[<>{}*…]|(^|[/-])[A-Z]+([/.-]|$)|^-/;
/** A path with at least one folder and a source extension, standing alone in running text. */
const PATH_IN_TEXT = /(?<![\w./-])([\w.-]+(?:\/[\w.-]+)+\.(?:ts|mts|mjs|py|cc|h|proto|sh|md))(?![\w/-])/g;
/** Files the docs name that live in other projects, by design. */
const ELSEWHERE = new Set([
  'include/node/node_api.h', // Node-API headers, shipped with Node
  'node_api.h',
  'models/resnet.py', // MedicalNet's own repository
  'gpu-pack/gpu-check.mjs', // written by scripts/gpu-pack.sh on the GPU machine
]);
const OUTSIDE: readonly RegExp[] = [/\.\.\/shared\//, /\bmethods\.md\b/, /\bbaselines\.md\b/, /(^|[\s(`'"])\/(work|root)\//];

/** GitHub's heading anchors: lower case, punctuation dropped except - and _, each space a hyphen. */
export function headingAnchor(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\s_-]/gu, '')
    .replace(/\s/g, '-');
}

function anchorsOf(text: string): Set<string> {
  const seen = new Map<string, number>();
  const anchors = new Set<string>();
  let fenced = false;
  for (const line of text.split('\n')) {
    if (line.startsWith('```')) fenced = !fenced;
    const m = fenced ? null : /^#{1,6}\s+(.*)$/.exec(line);
    if (!m) continue;
    const base = headingAnchor(m[1]);
    const n = seen.get(base) ?? 0;
    seen.set(base, n + 1);
    anchors.add(n === 0 ? base : `${base}-${n}`);
  }
  return anchors;
}

/** The tracked files; outside a git checkout (an unpacked release), every file but dependencies and build output. */
function repositoryFiles(root: string): string[] {
  try {
    return execFileSync('git', ['ls-files'], { cwd: root, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n').filter(Boolean);
  } catch {
    return (readdirSync(root, { recursive: true, withFileTypes: true }) as Dirent[])
      .filter((e) => e.isFile())
      .map((e) => relative(root, join(e.parentPath, e.name)))
      .filter((f) => !/^(node_modules|\.git|native\/build)\//.test(f));
  }
}

/** Every problem in `files` (default: all tracked Markdown), as `path:line: what`. */
export function checkDocs(root: string, files?: readonly string[]): string[] {
  const tracked = repositoryFiles(root);
  const trackedFiles = new Set(tracked);
  const trackedDirs = new Set(tracked.flatMap((f) => f.split('/').slice(0, -1).map((_, i, parts) => parts.slice(0, i + 1).join('/'))));
  const anchorCache = new Map<string, Set<string>>();
  const anchors = (file: string) => anchorCache.get(file) ?? anchorCache.set(file, anchorsOf(readFileSync(join(root, file), 'utf8'))).get(file)!;
  const namesTrackedFile = (token: string, docDir: string): boolean => {
    const path = token.replace(/^\.\//, '');
    if (trackedFiles.has(path) || trackedFiles.has(normalize(join(docDir, path)))) return true;
    return tracked.some((f) => f.endsWith(`/${path}`));
  };

  const problems: string[] = [];
  for (const file of files ?? tracked.filter((f) => f.endsWith('.md'))) {
    const docDir = dirname(file);
    readFileSync(join(root, file), 'utf8')
      .split('\n')
      .forEach((line, i) => {
        const where = `${file}:${i + 1}`;
        for (const pattern of OUTSIDE) {
          if (pattern.test(line)) problems.push(`${where}: cites something outside the repository (${pattern.source})`);
        }
        for (const [, target] of line.matchAll(/\]\(([^)\s]+)\)/g)) {
          if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // https:, mailto:
          const [path, anchor] = target.split('#');
          const resolved = path === '' ? file : normalize(join(docDir, path)).replace(/\/$/, '');
          if (resolved.startsWith('..')) {
            problems.push(`${where}: link leaves the repository: ${target}`);
          } else if (!trackedFiles.has(resolved) && !trackedDirs.has(resolved)) {
            problems.push(`${where}: link to a file that is not in the repository: ${target}`);
          } else if (anchor && resolved.endsWith('.md') && !anchors(resolved).has(anchor)) {
            problems.push(`${where}: link to a heading that ${resolved} does not have: ${target}`);
          }
        }
        const backticked = [...line.matchAll(/`([^`\s]+)`/g)].map((m) => m[1]);
        // Paths in running text too (`docs/data.md` is often written without backticks); URLs are not paths here.
        const inText = [...line.replace(/`[^`]*`|https?:\/\/\S+|\]\([^)]*\)/g, ' ').matchAll(PATH_IN_TEXT)].map((m) => m[1]);
        for (const token of [...backticked, ...inText]) {
          if (!SOURCE_PATH.test(token) || PLACEHOLDER.test(token) || token.startsWith('/') || ELSEWHERE.has(token)) continue;
          if (!namesTrackedFile(token, docDir)) problems.push(`${where}: names a file that is not in the repository: \`${token}\``);
        }
      });
  }
  return problems;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const args = process.argv.slice(2);
  const rootAt = args.indexOf('--root');
  const root = rootAt >= 0 ? resolve(args.splice(rootAt, 2)[1]) : resolve(dirname(fileURLToPath(import.meta.url)), '..');
  const problems = checkDocs(root, args.length > 0 ? args : undefined);
  for (const p of problems) process.stderr.write(`${p}\n`);
  if (problems.length > 0) {
    process.stderr.write(`${problems.length} problem(s)\n`);
    process.exit(1);
  }
  process.stdout.write('docs check: every link and named file resolves\n');
}
