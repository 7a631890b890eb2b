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
 *
 * A window may be shared by two threads (share/attach: a datagram session
 * and its packet thread, core/datapath/): accept() then runs under a tiny
 * lock in the shared memory, so a counter is accepted once between them.
 */

/** Words in the ring; a power of two so the ring index is a mask. 128 words = 512 bytes. */
const RING_WORDS = 128;
const RING_MASK = RING_WORDS - 1;
const WORD_BITS = 32;
// Int32 slots: a lock (shared windows), the highest counter as two 32-bit halves, then the ring.
const LOCK = 0;
const HIGH_LO = 1;
const HIGH_HI = 2;
const RING = 4;
const SLOTS = RING + RING_WORDS;
const TWO_POW_32 = 0x1_0000_0000;

/*
 * The lock of a shared window: LOCK is 0 (free), 1 (held) or 2 (held, and
 * a thread may sleep on it). It is held for a few dozen instructions and
 * never across a call out, so a thread that finds it held spins; only one
 * that spun long (the holder was descheduled) sleeps, and marks it 2 so
 * the release wakes it. An uncontended release is one exchange: no futex
 * call, which in V8 takes a process-wide mutex.
 */
const SPINS = 1000;

function lock(s: Int32Array<ArrayBufferLike>): void {
  if (Atomics.compareExchange(s, LOCK, 0, 1) === 0) return;
  for (let spins = 0; spins < SPINS; spins++) {
    if (Atomics.load(s, LOCK) === 0 && Atomics.compareExchange(s, LOCK, 0, 1) === 0) return;
  }
  // Whoever takes it from here leaves it at 2, so its release wakes the next sleeper (at worst one needless wake).
  while (Atomics.exchange(s, LOCK, 2) !== 0) Atomics.wait(s, LOCK, 2, 1);
}

function unlock(s: Int32Array<ArrayBufferLike>): void {
  if (Atomics.exchange(s, LOCK, 0) === 2) Atomics.notify(s, LOCK, 1);
}

export class ReplayWindow {
  /** Counters at least this far behind the highest accepted one are refused. */
  static readonly SIZE = (RING_WORDS - 1) * WORD_BITS;

  /** State (see the slots above); in a SharedArrayBuffer once shared. */
  private state: Int32Array<ArrayBufferLike> = new Int32Array(SLOTS);
  private shared = false;

  /**
   * True when `counter` would be accepted: an integer in [0, limit), not seen
   * before, and less than SIZE behind the highest. Changes nothing.
   */
  check(counter: number, limit = Number.MAX_SAFE_INTEGER): boolean {
    if (!Number.isInteger(counter) || counter < 0 || counter >= limit) return false;
    // Unlocked even when shared: accept() checks again under the lock.
    return this.isNew(counter);
  }

  /**
   * Marks `counter` as seen if check() allows it and returns true; false
   * (and nothing changes) for a duplicate, one too old, or a bad counter.
   * On a shared window this is atomic across threads: each counter is
   * accepted once, whichever thread offers it.
   */
  accept(counter: number, limit = Number.MAX_SAFE_INTEGER): boolean {
    if (!Number.isInteger(counter) || counter < 0 || counter >= limit) return false;
    if (!this.shared) return this.mark(counter);
    const s = this.state;
    lock(s);
    try {
      return this.mark(counter);
    } finally {
      unlock(s);
    }
  }

  /** The highest counter accepted so far (0 when none). */
  get highestAccepted(): number {
    return this.highest();
  }

  /**
   * Move the window into a SharedArrayBuffer (once; later calls return the
   * same), so another thread can use it too (ReplayWindow.attach) while
   * this one goes on: both then accept every counter at most once between them.
   */
  share(): SharedArrayBuffer {
    if (!this.shared) {
      const state = new Int32Array(new SharedArrayBuffer(SLOTS * 4));
      state.set(this.state);
      this.state = state;
      this.shared = true;
    }
    return this.state.buffer as SharedArrayBuffer;
  }

  /** A window over `buffer`, from share() (possibly in another thread). */
  static attach(buffer: SharedArrayBuffer): ReplayWindow {
    if (buffer.byteLength !== SLOTS * 4) throw new RangeError('not a shared ReplayWindow');
    const window = new ReplayWindow();
    window.state = new Int32Array(buffer);
    window.shared = true;
    return window;
  }

  private highest(): number {
    return (this.state[HIGH_HI]! >>> 0) * TWO_POW_32 + (this.state[HIGH_LO]! >>> 0);
  }

  private isNew(counter: number): boolean {
    const highest = this.highest();
    if (counter > highest) return true;
    if (highest - counter >= ReplayWindow.SIZE) return false;
    const word = Math.floor(counter / WORD_BITS);
    return (this.state[RING + (word & RING_MASK)]! & (1 << (counter - word * WORD_BITS))) === 0;
  }

  private mark(counter: number): boolean {
    if (!this.isNew(counter)) return false;
    const s = this.state;
    const highest = this.highest();
    const word = Math.floor(counter / WORD_BITS);
    if (counter > highest) {
      // Clear the words between the old highest word and the new one: they
      // now stand for counters not seen yet (a jump of a whole ring clears all).
      const current = Math.floor(highest / WORD_BITS);
      const skipped = Math.min(word - current, RING_WORDS);
      for (let i = 1; i <= skipped; i++) s[RING + ((current + i) & RING_MASK)] = 0;
      s[HIGH_LO] = counter >>> 0;
      s[HIGH_HI] = Math.floor(counter / TWO_POW_32);
    }
    const at = RING + (word & RING_MASK);
    s[at] = s[at]! | (1 << (counter - word * WORD_BITS));
    return true;
  }
}
