/**
 * Two Links (type 'stream') connected in memory, for tests of anything that
 * runs over a Link. Delivery is asynchronous (setImmediate), in order, whole
 * records, in batches like a socket's chunks. Hooks let a test record,
 * tamper with or drop records in flight.
 *
 *   const { a, b } = memLinkPair({ tap: (rec, from) => (from === 'a' ? rec : rec) });
 *
 * Honours the Link contract strictly: nothing is delivered before start();
 * every delivered record is a buffer of its own (the receiver's to keep).
 *
 * With `inPlace`, the link also offers sendInPlace (2 bytes of headroom,
 * which it fills with a marker): 'keep' holds on to the caller's memory until
 * the batch is delivered (bufferedAmount > 0 meanwhile), so a sender that
 * reuses memory the link still holds delivers garbage and is caught; 'copy'
 * copies at once and leaves bufferedAmount at 0, so the sender may reuse it.
 */
import type { Link, LinkHandlers } from '../../core/types.ts';

export type Side = 'a' | 'b';

export interface MemLinkOptions {
  /** Largest record send() accepts (default 65535, like tcp). */
  maxRecordSize?: number;
  /** Bytes queued towards the peer above which send() returns false (default 256 KiB). */
  highWaterMark?: number;
  /**
   * Sees every record as sent (a copy) by side `from`; return what to deliver
   * (the same, a changed buffer, or null to drop it).
   */
  tap?: (record: Buffer, from: Side) => Buffer | null;
  /** Offer sendInPlace: 'keep' the caller's memory until delivery, or 'copy' it at once (see above). */
  inPlace?: 'keep' | 'copy';
  /**
   * Delay before a batch is delivered (default 0: the next setImmediate).
   * With a delay, records stay in flight while both sides keep sending, as on a network.
   */
  latencyMs?: number;
}

export interface MemLink extends Link {
  readonly side: Side;
  /** Records and bytes this side handed to send()/sendBatch()/sendInPlace(), before the tap. */
  readonly sent: { records: number; bytes: number; inPlace: number };
  /** True once closed or destroyed (either side). */
  readonly closed: boolean;
  /** Resolves when this side's close handler has run. */
  readonly whenClosed: Promise<Error | undefined>;
}

export function memLinkPair(opts: MemLinkOptions = {}): { a: MemLink; b: MemLink } {
  const a = new MemLinkImpl('a', opts);
  const b = new MemLinkImpl('b', opts);
  a.peer = b;
  b.peer = a;
  return { a, b };
}

class MemLinkImpl implements MemLink {
  readonly type = 'stream' as const;
  readonly remoteAddress: string;
  readonly maxRecordSize: number;
  readonly sent = { records: 0, bytes: 0, inPlace: 0 };
  readonly headroom?: number;
  readonly sendInPlace?: (record: Buffer) => boolean;
  peer!: MemLinkImpl;
  closed = false;
  readonly whenClosed: Promise<Error | undefined>;

  private handlers: LinkHandlers | null = null;
  /** Records on their way to the peer. */
  private outbox: Buffer[] = [];
  private outboxBytes = 0;
  /** Records that arrived before start(). */
  private inbox: Buffer[] = [];
  private flushScheduled = false;
  private wantsDrain = false;
  private closeAfterFlush = false;
  private closeHandled = false;
  private resolveClosed!: (err: Error | undefined) => void;
  private readonly highWaterMark: number;

  constructor(
    readonly side: Side,
    private readonly opts: MemLinkOptions,
  ) {
    this.remoteAddress = side === 'a' ? '127.0.0.1:2' : '127.0.0.1:1';
    this.maxRecordSize = opts.maxRecordSize ?? 65535;
    this.highWaterMark = opts.highWaterMark ?? 256 * 1024;
    this.whenClosed = new Promise((resolve) => (this.resolveClosed = resolve));
    if (opts.inPlace !== undefined) {
      this.headroom = 2;
      this.sendInPlace = (record) => {
        if (record.byteOffset < 2) throw new RangeError('memlink: sendInPlace without 2 bytes of headroom');
        const framed = Buffer.from(record.buffer, record.byteOffset - 2, record.length + 2);
        framed.writeUInt16BE(0xd5d5, 0);
        this.sent.inPlace++;
        return this.enqueue([opts.inPlace === 'keep' ? framed.subarray(2) : record], opts.inPlace === 'keep' ? 'keep' : 'take');
      };
    }
  }

  get bufferedAmount(): number {
    return this.outboxBytes;
  }

  start(handlers: LinkHandlers): void {
    if (this.handlers !== null) throw new Error('memlink: start() called twice');
    this.handlers = handlers;
    const early = this.inbox;
    this.inbox = [];
    for (const record of early) this.deliverOne(record);
    if (this.closed) this.runClose(undefined);
  }

  send(record: Buffer): boolean {
    return this.sendBatch([record]);
  }

  sendBatch(records: Buffer[]): boolean {
    return this.enqueue(records, 'send');
  }

  /**
   * send: copy and count as buffered. keep: queue the caller's memory itself
   * (copied only at delivery), counted as buffered. take: copy, and count it
   * as handed on (bufferedAmount stays 0).
   */
  private enqueue(records: Buffer[], how: 'send' | 'keep' | 'take'): boolean {
    if (this.closed || this.closeAfterFlush) return false;
    for (const record of records) {
      if (record.length > this.maxRecordSize) throw new RangeError(`memlink: record of ${record.length} bytes exceeds ${this.maxRecordSize}`);
      this.sent.records++;
      this.sent.bytes += record.length;
      const held = how === 'keep' ? record : Buffer.from(record);
      const delivered = this.opts.tap ? this.opts.tap(held, this.side) : held;
      if (delivered === null) continue;
      this.outbox.push(delivered);
      if (how !== 'take') this.outboxBytes += delivered.length;
    }
    this.scheduleFlush();
    if (this.outboxBytes > this.highWaterMark) {
      this.wantsDrain = true;
      return false;
    }
    return true;
  }

  close(): void {
    if (this.closed || this.closeAfterFlush) return;
    this.closeAfterFlush = true;
    this.scheduleFlush();
  }

  destroy(): void {
    if (this.closed) return;
    this.outbox = [];
    this.outboxBytes = 0;
    this.shutBoth();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    const latency = this.opts.latencyMs ?? 0;
    if (latency > 0) setTimeout(() => this.flush(), latency);
    else setImmediate(() => this.flush());
  }

  private flush(): void {
    this.flushScheduled = false;
    if (this.closed) return;
    const batch = this.outbox;
    this.outbox = [];
    this.outboxBytes = 0;
    for (const record of batch) {
      if (this.closed) return;
      this.peer.receive(Buffer.from(record));
    }
    if (this.closeAfterFlush) {
      this.shutBoth();
      return;
    }
    if (this.wantsDrain && this.outboxBytes <= this.highWaterMark) {
      this.wantsDrain = false;
      this.handlers?.drain();
    }
  }

  private receive(record: Buffer): void {
    if (this.closed) return;
    if (this.handlers === null) this.inbox.push(record);
    else this.deliverOne(record);
  }

  private deliverOne(record: Buffer): void {
    this.handlers!.record(record);
  }

  private shutBoth(): void {
    for (const link of [this, this.peer]) {
      if (link.closed) continue;
      link.closed = true;
      link.outbox = [];
      link.outboxBytes = 0;
      if (link.handlers !== null) link.runClose(undefined);
    }
  }

  private runClose(err: Error | undefined): void {
    if (this.closeHandled) return;
    this.closeHandled = true;
    this.handlers!.close(err);
    this.resolveClosed(err);
  }
}
