/**
 * Who masks with whom. Classic SecAgg: everyone with everyone (n − 1 pair masks and shares per site).
 * SecAgg+ (Bell et al. 2020): a sparse k-regular graph with k = O(log n), here a random circulant graph —
 * the server shuffles the ids onto a ring and each site is joined to the k/2 nearest on either side — so a
 * site makes k pair masks and k sealed shares, and the server cancels k masks per drop-out. The ring
 * travels in the roster, so every site computes the same neighbourhoods and can check its own.
 */
import { randomInt } from 'node:crypto';

export interface NeighbourGraph {
  /** Even degree k (2 ≤ k < n). */
  k: number;
  /** All roster ids in ring order. */
  ring: number[];
}

export function randomRing(ids: readonly number[], k: number): NeighbourGraph {
  if (!Number.isInteger(k) || k < 2 || k % 2 !== 0) throw new RangeError(`neighbourhood degree ${k} must be an even whole number ≥ 2`);
  if (k >= ids.length) throw new RangeError(`degree ${k} needs more than ${k} sites (have ${ids.length}); use the complete graph instead`);
  const ring = [...ids];
  for (let i = ring.length - 1; i > 0; i--) {
    const j = randomInt(i + 1);
    [ring[i], ring[j]] = [ring[j]!, ring[i]!];
  }
  return { k, ring };
}

/** The other sites `id` pairs with (sorted): all others without a graph, else its ring neighbours. */
export function neighboursOf(id: number, memberIds: readonly number[], graph: NeighbourGraph | undefined): number[] {
  if (!graph) return memberIds.filter((v) => v !== id).sort((a, b) => a - b);
  const n = graph.ring.length;
  const pos = graph.ring.indexOf(id);
  if (pos < 0) throw new Error(`site ${id} is not on the neighbourhood ring`);
  const out = new Set<number>();
  for (let d = 1; d <= graph.k / 2; d++) {
    out.add(graph.ring[(pos + d) % n]!);
    out.add(graph.ring[(pos - d + n) % n]!);
  }
  return [...out].sort((a, b) => a - b);
}

/** Checks a graph received in a roster: a permutation of the roster ids and a usable degree. */
export function checkGraph(graph: NeighbourGraph, memberIds: readonly number[]): void {
  const a = [...graph.ring].sort((x, y) => x - y).join(',');
  const b = [...memberIds].sort((x, y) => x - y).join(',');
  if (a !== b) throw new Error('the neighbourhood ring is not a permutation of the roster: abort');
  if (!Number.isInteger(graph.k) || graph.k < 2 || graph.k % 2 !== 0 || graph.k >= memberIds.length) throw new Error(`neighbourhood degree ${graph.k} is not usable with ${memberIds.length} sites: abort`);
}
