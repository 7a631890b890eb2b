/**
 * Big-endian numbers read from bytes by index, for the per-packet path.
 *
 * Why not Buffer's readUInt32BE and the like: V8's optimized code still
 * looks each of those methods up through an inline cache on every call (a
 * call into V8's LoadIC: bench/FINDINGS.md, "What optimized code still
 * called on a packet's way"), where indexed reads of a Uint8Array compile
 * to plain loads. Where a buffer of one's own is read or written at fixed
 * places, a DataView over it does the same job.
 */

/** The unsigned 32-bit big-endian number at `at` (at + 4 <= p.length). */
export function u32be(p: Uint8Array, at: number): number {
  return ((p[at]! << 24) | (p[at + 1]! << 16) | (p[at + 2]! << 8) | p[at + 3]!) >>> 0;
}

/** The unsigned 16-bit big-endian number at `at` (at + 2 <= p.length). */
export function u16be(p: Uint8Array, at: number): number {
  return (p[at]! << 8) | p[at + 1]!;
}
