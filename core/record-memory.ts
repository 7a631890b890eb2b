/**
 * Memory a link reads records into, taken again once nothing reads it any
 * more, instead of fresh memory for every record.
 *
 * Why: a dialed tcp link reads each record into memory of its own, and
 * stream data reaches the reader as views of it (no copy). Fresh memory per
 * 64 KiB record, freed only when a scavenge collects the views, grew the
 * client's malloc heap by ~30 MB during its first download (~9,000 page
 * faults) and kept the memory it writes into cold in the cache.
 *
 * Memory goes back to the pool only when all three hold:
 * - the reader has left it (`retireRecordMemory`): nothing more is read into it;
 * - every record delivered from it (`recordDelivered`) was vouched for by its
 *   consumer (`vouchRecord`): the consumer keeps no reference into the record
 *   but the views it counted;
 * - every counted view (`countView`) was released (`releaseView`), which its
 *   final reader does once it no longer reads it (a socket write, from the
 *   write's callback).
 * Anything short of that (a record nobody vouched for, a view nobody
 * releases, a view sliced further) leaves the memory to the garbage
 * collector, as if there were no pool: a mistake costs the reuse, never data.
 */

/** Free memory kept for reuse: a few records in flight per busy link (~1 MiB). */
const MAX_FREE = 16;

interface Lease {
  readonly memory: Buffer;
  delivered: number;
  vouched: number;
  views: number;
  retired: boolean;
}

const leases = new WeakMap<ArrayBufferLike, Lease>();
const counted = new WeakSet<Buffer>();
const free: Buffer[] = [];
let poolSize = 0;
let made = 0;

/** Memory of `size` bytes to read records into: reused when a free one of that size waits. */
export function takeRecordMemory(size: number): Buffer {
  if (size !== poolSize) {
    // One size is pooled (the link's read size); another size empties the pool.
    free.length = 0;
    poolSize = size;
  }
  let memory = free.pop();
  if (memory === undefined) {
    memory = Buffer.allocUnsafeSlow(size);
    made++;
  }
  leases.set(memory.buffer, { memory, delivered: 0, vouched: 0, views: 0, retired: false });
  return memory;
}

/**
 * Fresh memory of `size` bytes (from takeRecordMemory) that starts with
 * `memory`'s bytes from `from` to `to`: a reader's unparsed tail, moved
 * when the next record does not fit in what is left. `memory` is retired.
 */
export function carryIntoFresh(memory: Buffer, from: number, to: number, size: number): Buffer {
  const fresh = takeRecordMemory(size);
  memory.copy(fresh, 0, from, to);
  retireRecordMemory(memory);
  return fresh;
}

/** A record (a view of memory from takeRecordMemory) went to its consumer. */
export function recordDelivered(record: Buffer): void {
  const lease = leases.get(record.buffer);
  if (lease) lease.delivered++;
}

/** The reader reads no more into `memory`. */
export function retireRecordMemory(memory: Buffer): void {
  const lease = leases.get(memory.buffer);
  if (!lease) return;
  lease.retired = true;
  reuseIfDone(lease);
}

/**
 * The consumer is done with a delivered record (or its plaintext, a view
 * of the same memory): it holds nothing of it but views it counted.
 */
export function vouchRecord(part: Buffer): void {
  const lease = leases.get(part.buffer);
  if (!lease) return;
  lease.vouched++;
  reuseIfDone(lease);
}

/** `view` (of record memory) goes to a reader, who will release it. No-op for other memory. */
export function countView(view: Buffer): void {
  const lease = leases.get(view.buffer);
  if (!lease || counted.has(view)) return;
  counted.add(view);
  lease.views++;
}

/**
 * What to call once `chunk` is no longer read, or undefined if it is not a
 * counted view. Releasing more than once counts once.
 */
export function viewRelease(chunk: Buffer): (() => void) | undefined {
  if (!counted.has(chunk)) return undefined;
  return () => releaseView(chunk);
}

/** `chunk`, a counted view, is no longer read: its memory may go back to the pool. Counts once; no-op otherwise. */
export function releaseView(chunk: Buffer): void {
  if (!counted.delete(chunk)) return;
  const lease = leases.get(chunk.buffer);
  if (!lease) return;
  lease.views--;
  reuseIfDone(lease);
}

/** For tests and diagnostics: memory ever made, and memory free now. */
export function recordMemoryStats(): { made: number; free: number } {
  return { made, free: free.length };
}

function reuseIfDone(lease: Lease): void {
  if (!lease.retired || lease.views > 0 || lease.vouched !== lease.delivered) return;
  leases.delete(lease.memory.buffer);
  if (lease.memory.length === poolSize && free.length < MAX_FREE) free.push(lease.memory);
}
