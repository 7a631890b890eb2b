/**
 * How much of what went through a long-lived collection was promoted to the
 * old generation: the measure behind core/roster.ts and core/abort-watch.ts.
 * Turns on --expose-gc for the calling test process.
 */
import v8 from 'node:v8';
import vm from 'node:vm';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as (options?: { type: 'minor' }) => void;
const oldSpaceUsed = (): number => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'old_space')!.space_used_size;

/** A collection under test: add() returns what remove() needs besides the value. */
export interface Churnable {
  add(value: object): unknown;
  remove(ticket: unknown, value: object): void;
}

/**
 * Keeps 8 values of ~8 KB in `collection`, replacing one at a time 1,000
 * times, after a full GC has moved the collection to the old generation (as
 * time does to a server's). Returns how many bytes the old generation grew
 * by over three scavenges: about 8 MB when the collection keeps what left
 * it, next to nothing when it does not.
 */
export function promotedByChurn(collection: Churnable): number {
  const live: Array<{ value: object; ticket: unknown }> = [];
  const make = (i: number) => ({ payload: new Array<number>(1000).fill(i) });
  for (let i = 0; i < 8; i++) {
    const value = make(i);
    live.push({ value, ticket: collection.add(value) });
  }
  gc(); // a full GC ({ type: 'major' } does not move things out of the young generation)
  const before = oldSpaceUsed();
  for (let i = 0; i < 1000; i++) {
    const value = make(i);
    live.push({ value, ticket: collection.add(value) });
    const out = live.shift()!;
    collection.remove(out.ticket, out.value);
  }
  gc({ type: 'minor' });
  gc({ type: 'minor' });
  gc({ type: 'minor' });
  return oldSpaceUsed() - before;
}
