/**
 * YAML (or JSON) configuration validated by a zod schema, with every problem reported as
 * "SOURCE:LINE: path: message": plans, site policies and site task files all read this way.
 */
import { LineCounter, parseDocument, isMap, isSeq, isScalar, type Node } from 'yaml';
import type { z } from 'zod';

export interface LocatedYaml {
  /** The document as plain data. */
  readonly raw: unknown;
  /** Line of the deepest part of `path` present in the document (1-based), if any. */
  line(path: readonly (string | number)[]): number | undefined;
}

/** Parses YAML; syntax errors come back as located problem lines. */
export function readYaml(text: string, source: string): LocatedYaml | { problems: string[] } {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: true });
  if (doc.errors.length > 0) return { problems: doc.errors.map((e) => `${source}:${e.linePos?.[0]?.line ?? '?'}: ${e.message.split('\n')[0]}`) };
  return { raw: doc.toJS() ?? {}, line: (path) => lineOf(doc.contents, path.map(String), lc) };
}

/** Located problem lines for zod issues (an unknown key is pointed at by its own line). */
export function zodProblems(issues: readonly z.core.$ZodIssue[], source: string, doc: LocatedYaml): string[] {
  return issues.map((issue) => {
    const path = issue.path.map(String);
    const probe = issue.code === 'unrecognized_keys' ? [...path, (issue as { keys: string[] }).keys[0]] : path;
    const where = path.length > 0 ? path.join('.') : '(top level)';
    return `${source}:${doc.line(probe) ?? '?'}: ${where}: ${issue.message}`;
  });
}

/** Reads and validates in one go; `fail` turns the problem lines into the caller's error type. */
export function parseYamlConfig<S extends z.ZodType>(text: string, source: string, schema: S, fail: (problems: string[]) => Error): z.infer<S> {
  const doc = readYaml(text, source);
  if ('problems' in doc) throw fail(doc.problems);
  const r = schema.safeParse(doc.raw);
  if (r.success) return r.data;
  throw fail(zodProblems(r.error.issues, source, doc));
}

/**
 * Line of the deepest part of `path` that exists in the document: the key's own line for a map entry
 * (so an error about `local` points at `local:`, not at its first child), the item's line in a list.
 */
function lineOf(root: unknown, path: readonly string[], lc: LineCounter): number | undefined {
  let node = root as Node | null | undefined;
  let line = node && 'range' in node && node.range ? lc.linePos(node.range[0]).line : undefined;
  for (const seg of path) {
    if (isMap(node)) {
      const pair = node.items.find((p) => (isScalar(p.key) ? String(p.key.value) : String(p.key)) === seg);
      if (!pair) break;
      const key = pair.key as Node | null;
      if (key?.range) line = lc.linePos(key.range[0]).line;
      node = pair.value as Node | null;
    } else if (isSeq(node)) {
      const item = node.items[Number(seg)] as Node | undefined;
      if (!item) break;
      if (item.range) line = lc.linePos(item.range[0]).line;
      node = item;
    } else break;
  }
  return line;
}
