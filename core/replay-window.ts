/**
 * The anti-replay window for datagram records (RFC 6479): a datagram may
 * arrive late, out of order, or twice, so each record carries its counter,
 * and the receiver accepts every counter at most once as long as it is not
 * too far behind the highest it has seen.
 *
 * The bitmap is a ring of RING_WORDS 32-bit words; bit (c mod 32) of word
 * (c / 32 mod RING_WORDS) records counter c. When the highest counter moves
 * forward, only the words it skips over are cleared (no shifting), so an
 * update costs O(1) amortized however far it jumps. One word is always the
 * one being filled, so the guaranteed window is (RING_WORDS - 1) * 32 =
 * 4064 counters behind the highest; older counters are refused.
 *
 * Check before decrypting (cheap refusal of replays), accept after the
 * record authenticated: only authentic records may move the window.
 */

/** Words in the ring; a power of two so the ring index is a mask. 128 words = 512 bytes. */
const RING_WORDS = 128;
const RING_MASK = RING_WORDS - 1;
const WORD_BITS = 32;

export class ReplayWindow {
  /** Counters at least this far behind the highest accepted one are refused. */
  static readonly SIZE = (RING_WORDS - 1) * WORD_BITS;

  private readonly ring = new Uint32Array(RING_WORDS);
  /** The highest counter accepted so far (0 before any: counter 0 is still new, its bit is clear). */
  private highest = 0;

  /**
   * True when `counter` would be accepted: an integer in [0, limit), not seen
   * before, and less than SIZE behind the highest. Changes nothing.
   */
  check(counter: number, limit = Number.MAX_SAFE_INTEGER): boolean {
    if (!Number.isInteger(counter) || counter < 0 || counter >= limit) return false;
    if (counter > this.highest) return true;
    if (this.highest - counter >= ReplayWindow.SIZE) return false;
    const word = Math.floor(counter / WORD_BITS);
    return (this.ring[word & RING_MASK] & (1 << (counter - word * WORD_BITS))) === 0;
  }

  /**
   * Marks `counter` as seen if check() allows it and returns true; false
   * (and nothing changes) for a duplicate, one too old, or a bad counter.
   */
  accept(counter: number, limit = Number.MAX_SAFE_INTEGER): boolean {
    if (!this.check(counter, limit)) return false;
    const word = Math.floor(counter / WORD_BITS);
    if (counter > this.highest) {
      // Clear the words between the old highest word and the new one: they
      // now stand for counters not seen yet (a jump of a whole ring clears all).
      const current = Math.floor(this.highest / WORD_BITS);
      const skipped = Math.min(word - current, RING_WORDS);
      for (let i = 1; i <= skipped; i++) this.ring[(current + i) & RING_MASK] = 0;
      this.highest = counter;
    }
    this.ring[word & RING_MASK] |= 1 << (counter - word * WORD_BITS);
    return true;
  }

  /** The highest counter accepted so far (0 when none). */
  get highestAccepted(): number {
    return this.highest;
  }
}
