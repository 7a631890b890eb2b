/**
 * A view of a buffer from an offset to its end, made again only when the
 * buffer or the offset changes: a thread that reads, seals, opens and
 * writes its lone packets in the same places makes no view for each.
 * (A Buffer view is an object to build, and on a CPU back from idle the
 * code that builds one is cold: bench/FINDINGS.md.)
 *
 * Holds on to the last buffer it was given until it is given another.
 */
export class ViewOf {
  private buffer: Uint8Array | null = null;
  private at = -1;
  private view: Uint8Array = new Uint8Array(0);

  /** `buffer` from `at` (0 <= at <= buffer.length) to its end. */
  from(buffer: Uint8Array, at: number): Uint8Array {
    if (buffer !== this.buffer || at !== this.at) {
      this.view = buffer.subarray(at);
      this.buffer = buffer;
      this.at = at;
    }
    return this.view;
  }
}
