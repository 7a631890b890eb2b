/**
 * Datagrams to one destination gathered for one UDP GSO send
 * (UdpIo.sendSegments), under the kernel's rules for it: every datagram has
 * the first one's size except the last, which may be shorter; at most
 * MAX_SEGMENTS of them and MAX_BYTES together.
 *
 * Each datagram is copied in (1.4 KiB, far cheaper than the system call it
 * saves), so the sender's memory is free again at once.
 */

/** The most segments every kernel with UDP GSO takes in one send (UDP_MAX_SEGMENTS; recent kernels take more). */
export const MAX_SEGMENTS = 64;
/** The most UDP payload one IPv4 send can carry (65535 - 20 - 8). */
export const MAX_BYTES = 65507;

export class SegmentBatch<To> {
  /** The datagrams, back to back; `length` bytes of it are in use. */
  readonly memory = Buffer.allocUnsafeSlow(MAX_BYTES);
  length = 0;
  count = 0;
  /** The first datagram's size: every one but the last has it. */
  segmentSize = 0;
  /** The destination of every datagram in the batch (undefined while empty). */
  to: To | undefined;
  /** A shorter datagram came: it must stay the last. */
  private closed = false;

  /** Whether a datagram of `size` bytes to `to` can join this (non-empty) batch. */
  fits(size: number, to: To): boolean {
    return (
      to === this.to &&
      !this.closed &&
      size <= this.segmentSize &&
      this.count < MAX_SEGMENTS &&
      this.length + size <= MAX_BYTES
    );
  }

  /** Appends a datagram (the first of an empty batch, or one that `fits`); it must not be empty. */
  add(datagram: Uint8Array, to: To): void {
    if (this.count === 0) {
      this.segmentSize = datagram.length;
      this.to = to;
    } else if (datagram.length < this.segmentSize) {
      this.closed = true;
    }
    this.memory.set(datagram, this.length);
    this.length += datagram.length;
    this.count++;
  }

  /** The i-th datagram (a view of `memory`, valid until the next add after clear). */
  segment(i: number): Buffer {
    const start = i * this.segmentSize;
    return this.memory.subarray(start, Math.min(start + this.segmentSize, this.length));
  }

  clear(): void {
    this.length = 0;
    this.count = 0;
    this.segmentSize = 0;
    this.to = undefined;
    this.closed = false;
  }
}
