/**
 * Initiation replay protection. Every handshake initiation carries a TAI64N
 * timestamp (12 bytes: 8 bytes of seconds + 2^62, big-endian, then 4 bytes
 * of nanoseconds), and the server accepts one from a given client key only
 * when it is strictly newer than the last one it accepted from that key. A
 * recorded initiation sent again is therefore refused (silently), even on a
 * new connection.
 */

export const TIMESTAMP_LENGTH = 12;

const TAI64_LABEL = 1n << 62n;
const NANOS_PER_SECOND = 1_000_000_000n;
let lastIssued = 0n;

/**
 * Now as TAI64N, strictly greater than any value this process returned
 * before, so two handshakes in the same millisecond (a rekey right after a
 * reconnect) never carry the same timestamp.
 */
export function tai64nNow(): Buffer {
  let nanos = BigInt(Date.now()) * 1_000_000n;
  if (nanos <= lastIssued) nanos = lastIssued + 1n;
  lastIssued = nanos;
  const out = Buffer.alloc(TIMESTAMP_LENGTH);
  out.writeBigUInt64BE(TAI64_LABEL + nanos / NANOS_PER_SECOND, 0);
  out.writeUInt32BE(Number(nanos % NANOS_PER_SECOND), 8);
  return out;
}

/**
 * Remembers the newest accepted initiation timestamp per client key. Call
 * `accept` only after the key is authorized, so memory is bounded by the
 * number of authorized keys, whatever strangers send. One guard per server,
 * shared by all its connections.
 */
export class ReplayGuard {
  private readonly newest = new Map<string, Buffer>();

  /**
   * True (and the timestamp is remembered) only if `timestamp` is 12 bytes
   * and strictly newer than the last accepted from `publicKeyB64`.
   */
  accept(publicKeyB64: string, timestamp: Buffer): boolean {
    if (timestamp.length !== TIMESTAMP_LENGTH) return false;
    const last = this.newest.get(publicKeyB64);
    if (last !== undefined && Buffer.compare(timestamp, last) <= 0) return false;
    this.newest.set(publicKeyB64, Buffer.from(timestamp));
    return true;
  }

  /** Forget a key (e.g. when a client is removed). */
  forget(publicKeyB64: string): void {
    this.newest.delete(publicKeyB64);
  }

  get size(): number {
    return this.newest.size;
  }
}
