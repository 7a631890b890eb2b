/**
 * A single-producer single-consumer queue of packets in a SharedArrayBuffer,
 * so a TUN queue's worker and the main thread exchange packets without a
 * message, an allocation or a copy per packet (a cross-thread wake costs
 * ~10-20 µs on a small VM; a ring hands over whatever piled up meanwhile
 * for the price of one wake, and none while both sides are busy).
 *
 * Layout: a 64-byte header of Int32 slots, then CAPACITY data bytes (a power
 * of two). Records are [u32 length][bytes], 4-byte aligned, never split
 * across the end (a PAD record fills the tail instead). Head and tail are
 * free-running byte counters (mod 2^32); only the producer moves head, only
 * the consumer moves tail, each with an Atomics store after its data access,
 * which is what makes the data visible (or free) to the other side.
 *
 * Waking is left to the caller: the ring only keeps the flags
 * (CONSUMER_WAITING, PRODUCER_WAITING) and a sequence number to Atomics.wait
 * or Atomics.waitAsync on.
 */

const H_HEAD = 0;
const H_TAIL = 1;
/** Bumped by the producer after each batch; the consumer waits on it. */
const H_SEQ = 2;
/** Set by a consumer about to sleep on an empty ring. */
const H_CONSUMER_WAITING = 3;
/** Set by a producer that found the ring full. */
const H_PRODUCER_WAITING = 4;
/** Records the producer could not fit (dropped). */
const H_DROPPED = 5;
/** Free slots for the owner's own flags (e.g. "stop"). */
export const H_USER0 = 8;
export const HEADER_BYTES = 64;
const PAD = 0xffffffff;

function align4(n: number): number {
  return (n + 3) & ~3;
}

export class PacketRing {
  readonly sab: SharedArrayBuffer;
  readonly capacity: number;
  private readonly header: Int32Array;
  private readonly data: Uint8Array;
  private readonly view: DataView;
  private readonly mask: number;
  /** The producer's reservation: offset of the length word, or -1. */
  private reservedAt = -1;

  /** A new ring of `capacity` data bytes (rounded up to a power of two, at least 4 KiB). */
  static create(capacity: number): PacketRing {
    let cap = 4096;
    while (cap < capacity) cap *= 2;
    return new PacketRing(new SharedArrayBuffer(HEADER_BYTES + cap));
  }

  /** Attach to a ring created elsewhere (e.g. in another thread). */
  constructor(sab: SharedArrayBuffer) {
    this.sab = sab;
    this.capacity = sab.byteLength - HEADER_BYTES;
    if (this.capacity < 4096 || (this.capacity & (this.capacity - 1)) !== 0) throw new RangeError('ring capacity must be a power of two >= 4096');
    this.mask = this.capacity - 1;
    this.header = new Int32Array(sab, 0, HEADER_BYTES / 4);
    this.data = new Uint8Array(sab, HEADER_BYTES, this.capacity);
    this.view = new DataView(sab, HEADER_BYTES, this.capacity);
  }

  /** The Int32 header, for Atomics.wait / waitAsync / notify on SEQ_INDEX and user slots. */
  get int32(): Int32Array {
    return this.header;
  }
  static readonly SEQ_INDEX = H_SEQ;

  /** Bytes in use (records, length words and padding). */
  get used(): number {
    return (Atomics.load(this.header, H_HEAD) - Atomics.load(this.header, H_TAIL)) >>> 0;
  }

  get dropped(): number {
    return Atomics.load(this.header, H_DROPPED) >>> 0;
  }

  // -------------------------------------------------------------------------
  // producer side

  /**
   * A view of contiguous space for one record of at most `maxLen` bytes, to
   * fill (e.g. by read(2)) and then `commit`. Null when the ring is full.
   */
  reserve(maxLen: number): Uint8Array | null {
    const need = 4 + align4(maxLen);
    if (need > this.capacity / 2) throw new RangeError(`record of ${maxLen} bytes is too large for this ring`);
    let head = Atomics.load(this.header, H_HEAD) >>> 0;
    const tail = Atomics.load(this.header, H_TAIL) >>> 0;
    let free = this.capacity - ((head - tail) >>> 0);
    let off = head & this.mask;
    const toEnd = this.capacity - off;
    if (toEnd < need) {
      // Skip the tail end of the buffer; the consumer jumps over the PAD.
      if (free < toEnd + need) return null;
      this.view.setUint32(off, PAD, true);
      head = (head + toEnd) >>> 0;
      Atomics.store(this.header, H_HEAD, head | 0);
      free -= toEnd;
      off = 0;
    }
    if (free < need) return null;
    this.reservedAt = off;
    return this.data.subarray(off + 4, off + 4 + maxLen);
  }

  /** Publish the reserved record with its real length (<= the reserved maxLen). */
  commit(len: number): void {
    const off = this.reservedAt;
    if (off < 0) throw new Error('commit without reserve');
    this.reservedAt = -1;
    this.view.setUint32(off, len, true);
    const head = Atomics.load(this.header, H_HEAD) >>> 0;
    Atomics.store(this.header, H_HEAD, (head + 4 + align4(len)) | 0);
  }

  /** The largest record this ring takes. */
  get maxRecord(): number {
    return this.capacity / 2 - 4;
  }

  /** Copy one record in. False (and counted as dropped) when it does not fit now, or ever (> maxRecord). */
  push(packet: Uint8Array): boolean {
    const slot = packet.length <= this.maxRecord ? this.reserve(packet.length) : null;
    if (slot === null) {
      Atomics.add(this.header, H_DROPPED, 1);
      return false;
    }
    slot.set(packet);
    this.commit(packet.length);
    return true;
  }

  /** Free bytes, ignoring fragmentation at the end of the buffer. */
  get free(): number {
    return this.capacity - this.used;
  }

  /** Tell the consumer a batch is there: bump SEQ; true if it was waiting (caller must wake it). */
  publish(): boolean {
    Atomics.add(this.header, H_SEQ, 1);
    if (Atomics.load(this.header, H_CONSUMER_WAITING) !== 0) {
      Atomics.store(this.header, H_CONSUMER_WAITING, 0);
      return true;
    }
    return false;
  }

  /** Producer found the ring full: ask to be woken when the consumer frees space. */
  markProducerWaiting(): void {
    Atomics.store(this.header, H_PRODUCER_WAITING, 1);
  }

  // -------------------------------------------------------------------------
  // consumer side

  /** True when there is a record to read. */
  get hasData(): boolean {
    return Atomics.load(this.header, H_HEAD) !== Atomics.load(this.header, H_TAIL);
  }

  /**
   * Call `fn` with each record (at most `max`), as a view valid only during
   * the call, then `end` (if given), then free their space: until then the
   * producer sees them as queued. Returns how many were delivered.
   */
  consume(fn: (packet: Uint8Array) => void, max: number, end?: () => void): number {
    const head = Atomics.load(this.header, H_HEAD) >>> 0;
    let tail = Atomics.load(this.header, H_TAIL) >>> 0;
    let n = 0;
    try {
      while (tail !== head && n < max) {
        const off = tail & this.mask;
        const len = this.view.getUint32(off, true);
        if (len === PAD) {
          tail = (tail + (this.capacity - off)) >>> 0;
          continue;
        }
        n++;
        // Advance before calling fn so a throwing handler cannot make us deliver the record twice.
        const rec = this.data.subarray(off + 4, off + 4 + len);
        tail = (tail + 4 + align4(len)) >>> 0;
        fn(rec);
      }
      end?.();
    } finally {
      Atomics.store(this.header, H_TAIL, tail | 0);
    }
    return n;
  }

  /**
   * Mark the consumer as about to sleep. Returns false if data arrived
   * meanwhile (do not sleep then). The store-then-load order pairs with the
   * producer's publish(), so a wake is never lost.
   */
  prepareToWait(): boolean {
    Atomics.store(this.header, H_CONSUMER_WAITING, 1);
    if (this.hasData) {
      Atomics.store(this.header, H_CONSUMER_WAITING, 0);
      return false;
    }
    return true;
  }

  /** The consumer is awake again (after its sleep): the producer need not wake it. */
  doneWaiting(): void {
    Atomics.store(this.header, H_CONSUMER_WAITING, 0);
  }

  /** After consuming: true if the producer was waiting for space (caller must wake it). */
  takeProducerWaiting(): boolean {
    if (Atomics.load(this.header, H_PRODUCER_WAITING) !== 0) {
      Atomics.store(this.header, H_PRODUCER_WAITING, 0);
      return true;
    }
    return false;
  }
}
