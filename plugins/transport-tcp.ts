/**
 * transport "tcp": records over one TCP connection, each framed as
 *
 *   2-byte big-endian length || record        (length 0..65535; 0 is legal)
 *
 * Receiving (RecordReader) never copies a whole record that the socket read
 * in one piece. A dialed socket reads straight into memory the reader sizes
 * from the headers it has seen (net.Socket's `onread`), so records of the
 * largest size arrive whole and in place (a record of 65535 bytes and its
 * header are one byte more than Node's 64 KiB read, so every one of them
 * used to span two reads and be copied). Node offers `onread` only for
 * sockets it creates, so an accepted socket reads 'data' events: a record
 * inside one chunk is a subarray of it, one split across chunks is assembled
 * into a buffer of its size. Once it carries bulk records it is made again
 * to read in place too (TcpLink.readInPlace). Per link at most one read
 * buffer (a full record and two headers) or one partial record (< 64 KiB)
 * is held.
 *
 * Any byte stream parses as records (a 2-byte length cannot be invalid), so
 * garbage from a scanner reaches the session layer as records it discards:
 * that is what keeps the server silent on a stream transport.
 *
 * Sending: `sendInPlace` writes the length into the 2 bytes the caller left
 * free before the record and hands that region to the socket with no copy;
 * `send` copies header and record into one buffer. They return false once
 * HIGH_WATER bytes wait in user space; after a false, the socket's 'drain'
 * becomes `handlers.drain()`. A record larger than 65535 bytes is a caller's bug, not
 * network input: `send`/`sendInPlace`/`sendBatch` throw a RangeError for it
 * (and write nothing), so it fails loudly instead of stalling a caller that
 * would wait for a drain that never comes.
 */
import net from 'node:net';
import { definePlugin } from '../core/define.ts';
import { abortError, describeDialError, describeListenError } from '../core/net-errors.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { formatHostPort, formatPeer, parseHostPort } from '../core/hostport.ts';
import type { Link, LinkHandlers, Logger, TransportListener, TransportPlugin } from '../core/types.ts';
import { carryIntoFresh, recordDelivered, retireRecordMemory } from '../core/record-memory.ts';
import { BulkReads, onreadInto } from '../core/reopen-socket.ts';

const MAX_RECORD = 0xffff;
/**
 * close() flushes and then waits for the peer to finish the close; a peer that
 * takes longer than this (not reading, or gone) is cut off, so a closed link
 * cannot hold its socket and queue forever.
 */
const CLOSE_GRACE_MS = 30_000;
/**
 * sendBatch() copies a batch into one buffer up to this total; beyond it, it
 * corks and writes one framed buffer per record (one writev). send() always
 * copies header + record into one buffer: measured on loopback, that beats
 * cork + two writes (a writev of two buffers) at every size up to 16 KiB and
 * beyond, the copy costing less than Node's writev path.
 */
const BATCH_CONCAT_MAX = 64 * 1024;
/**
 * send() returns false once this many bytes wait in user space (like the ws
 * transport), not at the socket's own 16 KiB mark: a 64 KiB record alone is
 * above that, so every record said false and stopped the mux until the
 * next tick's 'drain', even when the kernel had taken it all.
 */
const HIGH_WATER = 256 * 1024;

// Receive states.
const READ_HEADER = 0;
const READ_BODY = 1;

/**
 * Memory for reads into a reader (onread), taken when the next record does
 * not fit in what is left: a record of the largest size with its header, and
 * the header after it. Bulk records then each arrive in memory of their own
 * however the kernel splits the reads, and only the next header is moved;
 * a smaller record that does not fit in what is left is moved once. Larger
 * memory would mean fewer reads, but the mux hands DATA frames (16 KiB) out
 * as views only of memory at most about four times their size (mux.ts,
 * dataChunk) and copies them otherwise: tried with 256 KiB, the client made
 * 40 % fewer reads and copied every byte in the mux instead.
 */
const FRESH_READ = 2 + MAX_RECORD + 2;
/** Below this much room left, a read goes to fresh memory rather than the rest of the last. */
const MIN_ROOM = 4096;
const NO_MEMORY = Buffer.alloc(0);

/**
 * Splits a byte stream into records and calls `deliver` once per whole
 * record, in order. It is fed in one of two ways, never both:
 *
 * - `push(chunk)`: chunks the socket read into its own memory ('data'
 *   events). A record inside one chunk is a subarray of it; a record split
 *   across chunks is assembled into a buffer of exactly its size.
 * - `readBuffer()` / `wrote(n)`: the socket reads into memory this reader
 *   hands out (net.Socket's `onread`), sized from the headers it has seen
 *   (FRESH_READ), so the kernel copies each record into the memory it is
 *   delivered in. Only a record that starts too late in one piece of memory
 *   to fit is moved, once, to the front of the next.
 */
export class RecordReader {
  private state = READ_HEADER;
  /** The first length byte when a header was split across chunks, else -1. */
  private headerHigh = -1;
  /** The record being assembled across chunks (READ_BODY only). */
  private body: Buffer | null = null;
  private filled = 0;

  /** onread mode: the memory the socket reads into, its filled length, and the first byte not yet parsed. */
  private memory: Buffer = NO_MEMORY;
  private end = 0;
  private at = 0;

  constructor(private readonly deliver: (record: Buffer) => void) {}

  push(chunk: Buffer): void {
    const end = chunk.length;
    let at = 0;
    while (at < end) {
      if (this.state === READ_HEADER) {
        let length: number;
        if (this.headerHigh >= 0) {
          length = (this.headerHigh << 8) | chunk[at]!;
          this.headerHigh = -1;
          at += 1;
        } else if (end - at >= 2) {
          length = chunk.readUInt16BE(at);
          at += 2;
        } else {
          this.headerHigh = chunk[at]!;
          return;
        }
        if (end - at >= length) {
          // The whole record is in this chunk: no copy.
          this.deliver(chunk.subarray(at, at + length));
          at += length;
        } else {
          this.body = Buffer.allocUnsafe(length);
          this.filled = chunk.copy(this.body, 0, at, end);
          this.state = READ_BODY;
          return;
        }
      } else {
        const body = this.body!;
        const n = chunk.copy(body, this.filled, at, Math.min(end, at + body.length - this.filled));
        this.filled += n;
        at += n;
        if (this.filled === body.length) {
          this.body = null;
          this.state = READ_HEADER;
          this.deliver(body);
        }
      }
    }
  }

  /**
   * From push() to readBuffer()/wrote(), once: what the chunks so far left
   * unfinished (a header's first byte, the start of a record) stays, as the
   * socket read it, for the next reads to complete.
   */
  readFromNowOn(): void {
    let pending = NO_MEMORY;
    if (this.headerHigh >= 0) {
      pending = Buffer.from([this.headerHigh]);
    } else if (this.state === READ_BODY) {
      const body = this.body!;
      pending = Buffer.allocUnsafe(2 + this.filled);
      pending.writeUInt16BE(body.length, 0);
      body.copy(pending, 2, 0, this.filled);
    }
    this.state = READ_HEADER;
    this.headerHigh = -1;
    this.body = null;
    this.filled = 0;
    // Exactly the pending bytes: the first readBuffer() moves them into record memory.
    this.memory = pending;
    this.at = 0;
    this.end = pending.length;
  }

  /** Undoes readFromNowOn() before any read into the reader's memory: the pending bytes go back to push()'s state. */
  readFromChunks(): void {
    const pending = Buffer.from(this.memory.subarray(this.at, this.end));
    retireRecordMemory(this.memory);
    this.memory = NO_MEMORY;
    this.at = 0;
    this.end = 0;
    // A partial record: push() keeps it and delivers nothing.
    if (pending.length > 0) this.push(pending);
  }

  /**
   * Where the socket should read next: the unwritten rest of the current
   * memory, never empty. The reader never writes into memory it has handed
   * out; delivered records are views of it, so once it is left behind it
   * lives as long as someone holds one of its records, or goes back to the
   * pool once their consumers say they hold nothing (core/record-memory.ts).
   */
  readBuffer(): Buffer {
    const memory = this.memory;
    const have = this.end - this.at;
    // Room the next record needs from its first byte: itself and the header after it (or MIN_ROOM, unknown yet).
    const need = have >= 2 ? 2 + memory.readUInt16BE(this.at) + 2 : MIN_ROOM;
    if (this.at + need > memory.length) {
      // The partial record moves to the front of fresh memory: in bulk traffic that is one header.
      this.memory = carryIntoFresh(memory, this.at, this.end, FRESH_READ);
      this.at = 0;
      this.end = have;
    }
    return this.memory.subarray(this.end);
  }

  /** The socket put `n` bytes at the start of the last `readBuffer()`: deliver every record now whole. */
  wrote(n: number): void {
    const memory = this.memory;
    let end = (this.end += n);
    while (end - this.at >= 2) {
      const at = this.at;
      const length = memory.readUInt16BE(at);
      if (end - at - 2 < length) break;
      this.at = at + 2 + length;
      const record = memory.subarray(at + 2, at + 2 + length);
      recordDelivered(record);
      this.deliver(record);
      end = this.end;
    }
  }
}

function checkSize(record: Buffer): void {
  if (record.length > MAX_RECORD) {
    throw new RangeError(`tcp transport: a record of ${record.length} bytes exceeds the maximum of ${MAX_RECORD}`);
  }
}

function frame(record: Buffer): Buffer {
  const out = Buffer.allocUnsafe(2 + record.length);
  out.writeUInt16BE(record.length, 0);
  record.copy(out, 2);
  return out;
}

class TcpLink implements Link {
  readonly type = 'stream' as const;
  readonly maxRecordSize = MAX_RECORD;
  readonly remoteAddress: string;
  private handlers: LinkHandlers | undefined;
  private readonly reader: RecordReader;
  /** The socket was made reading into the reader's memory (onread, a dialed one); otherwise it reads 'data' events from start(). */
  private readonly readsInPlace: boolean;
  /** An accepted socket's reads, until they show bulk records (see readInPlace). */
  private readonly bulk: BulkReads;
  /** 'open' -> 'closing' (close()/destroy() called) -> 'closed' (the socket is gone). */
  private state: 'open' | 'closing' | 'closed' = 'open';
  private error: Error | undefined;
  private closeDelivered = false;
  private graceTimer: NodeJS.Timeout | undefined;

  /**
   * `reader`: the socket was made with `onread` feeding it (see dial), and it
   * delivers to `receive`. Without one, the link reads 'data' events.
   */
  constructor(
    private socket: net.Socket,
    private readonly log: Logger,
    reader?: RecordReader,
  ) {
    socket.setNoDelay(true);
    // Nothing is delivered before start(). Accepted sockets are not read at all
    // until then (pauseOnConnect); a dialed one is paused before its first read.
    socket.pause();
    this.remoteAddress = formatPeer(socket.remoteAddress, socket.remotePort);
    this.readsInPlace = reader !== undefined;
    this.reader = reader ?? new RecordReader((record) => this.receive(record));
    this.bulk = new BulkReads(socket);
    this.watch(socket);
  }

  /** The link's listeners on `socket`; they fall silent once the link has moved to another (readInPlace). */
  private watch(socket: net.Socket): void {
    socket.on('error', (err) => {
      if (socket !== this.socket) return;
      this.error ??= err;
      this.log.debug('link error', { remote: this.remoteAddress, error: err.message });
    });
    socket.on('close', () => {
      if (socket !== this.socket) return;
      this.state = 'closed';
      clearTimeout(this.graceTimer);
      if (this.handlers) this.deliverClose();
    });
    socket.on('drain', () => {
      if (socket !== this.socket || this.state !== 'open' || !this.handlers) return;
      try {
        this.handlers.drain();
      } catch (err) {
        this.fail(err);
      }
    });
  }

  get bufferedAmount(): number {
    return this.socket.writableLength;
  }

  start(handlers: LinkHandlers): void {
    if (this.handlers) throw new Error('tcp transport: link.start() called twice');
    this.handlers = handlers;
    if (this.state === 'closed') {
      process.nextTick(() => this.deliverClose());
      return;
    }
    if (!this.readsInPlace) {
      const socket = this.socket;
      socket.on('data', (chunk: Buffer) => {
        // After close(): read to EOF, discard. A handler's throw is caught in receive().
        if (socket !== this.socket || this.state !== 'open') return;
        this.reader.push(chunk);
        if (this.bulk.due(chunk.length) && this.state === 'open') this.readInPlace();
      });
    }
    this.socket.resume();
  }

  /**
   * An accepted socket reads 'data' events, each chunk in fresh memory
   * that a scavenge frees, and a record split across two chunks is copied
   * (Node offers `onread` only for sockets it makes). Once the link carries
   * bulk records (an upload through the server: BulkReads), the socket is
   * made again over the same connection to read into the reader's memory,
   * as a dialed link does (core/reopen-socket.ts). Where that cannot be done
   * the link goes on with 'data' events.
   */
  private readInPlace(): void {
    const reader = this.reader;
    // The new socket asks the reader for memory as it is made.
    reader.readFromNowOn();
    const socket = this.bulk.reopen(this.socket, reader);
    if (socket === null) {
      reader.readFromChunks();
      return;
    }
    this.socket = socket;
    this.watch(socket);
    socket.resume();
  }

  /** One whole record from the reader. */
  receive(record: Buffer): void {
    // After close() the socket is read to EOF and discarded; a handler may also close the link mid-chunk.
    if (this.state !== 'open') return;
    try {
      this.handlers!.record(record);
    } catch (err) {
      this.fail(err);
    }
  }

  send(record: Buffer): boolean {
    checkSize(record);
    if (this.state !== 'open' || !this.socket.writable) return false;
    this.socket.write(frame(record));
    return this.belowHighWater();
  }

  readonly headroom = 2;

  sendInPlace(record: Buffer): boolean {
    checkSize(record);
    if (this.state !== 'open' || !this.socket.writable) return false;
    const framed = Buffer.from(record.buffer, record.byteOffset - 2, record.length + 2);
    framed.writeUInt16BE(record.length, 0);
    this.socket.write(framed);
    return this.belowHighWater();
  }

  sendBatch(records: Buffer[]): boolean {
    let total = 0;
    for (const r of records) {
      checkSize(r);
      total += 2 + r.length;
    }
    if (this.state !== 'open' || !this.socket.writable) return false;
    if (records.length === 0) return this.belowHighWater();
    if (total <= BATCH_CONCAT_MAX) {
      const out = Buffer.allocUnsafe(total);
      let at = 0;
      for (const r of records) {
        out.writeUInt16BE(r.length, at);
        at += 2 + r.copy(out, at + 2);
      }
      this.socket.write(out);
    } else {
      this.socket.cork();
      for (const r of records) this.socket.write(frame(r));
      this.socket.uncork();
    }
    return this.belowHighWater();
  }

  /**
   * Above HIGH_WATER the socket's own write said false too (its mark is
   * lower), so its 'drain' is due: that is handlers.drain().
   */
  private belowHighWater(): boolean {
    return this.socket.writableLength < HIGH_WATER;
  }

  close(): void {
    if (this.state !== 'open') return;
    this.state = 'closing';
    // end() flushes what is queued, then sends FIN; we keep reading (and
    // discarding) until the peer's FIN so the close completes cleanly.
    this.socket.end();
    this.socket.resume();
    this.graceTimer = setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  destroy(): void {
    if (this.state === 'closed') return;
    this.state = 'closing';
    this.socket.destroy();
  }

  /** A handler threw: that is a bug upstream, but it must not take the process down. */
  private fail(err: unknown): void {
    const e = err instanceof Error ? err : new Error(String(err));
    this.log.error('a link handler threw; closing the link', { remote: this.remoteAddress, error: e.message });
    this.error ??= e;
    this.state = 'closing';
    this.socket.destroy();
  }

  private deliverClose(): void {
    if (this.closeDelivered) return;
    this.closeDelivered = true;
    try {
      this.handlers!.close(this.error);
    } catch (err) {
      this.log.error('a link close handler threw', { remote: this.remoteAddress, error: (err as Error).message });
    }
  }
}

export interface TcpOptions {
  connectTimeout: number;
  keepAlive: number;
}

export default definePlugin<'transport', TcpOptions>({
  kind: 'transport',
  name: 'tcp',
  description: 'records over TCP, each framed with a 2-byte length',
  options: {
    connectTimeout: {
      type: 'number',
      description: 'milliseconds to wait for the TCP connection to the server',
      default: 10_000,
      validate: (v) => (Number.isFinite(v) && (v as number) > 0 ? undefined : 'must be a positive number'),
    },
    keepAlive: {
      type: 'number',
      description: 'milliseconds of silence before TCP keepalive probes start; 0 turns them off',
      default: 60_000,
      validate: (v) => (Number.isFinite(v) && (v as number) >= 0 ? undefined : 'must be 0 or a positive number'),
    },
  },
  create(options, ctx): TransportPlugin {
    const connectTimeout = options.connectTimeout ?? 10_000;
    const keepAliveMs = options.keepAlive ?? 60_000;
    const keepAlive = keepAliveMs > 0;
    const log = ctx.log;
    const listeners = new Set<TransportListener>();

    const listen = async (address: string, onLink: (link: Link) => void): Promise<TransportListener> => {
      const { host, port } = parseHostPort(address, 'tcp listen address');
      const shown = formatHostPort(host, port);
      const server = net.createServer({
        pauseOnConnect: true,
        noDelay: true,
        keepAlive,
        keepAliveInitialDelay: keepAliveMs,
      });
      await new Promise<void>((resolve, reject) => {
        server.once('error', (err: NodeJS.ErrnoException) =>
          reject(
            new DshieldError(ErrorCodes.LISTEN, `cannot listen on ${shown}: ${describeListenError(err)}`, {
              cause: err,
              detail: { address: shown, code: err.code },
            }),
          ),
        );
        server.listen({ host, port }, () => resolve());
      });
      // Accept errors (EMFILE...) arrive here; without a listener they would crash the process.
      server.on('error', (err) => log.warn('tcp listener error', { address: shown, error: err.message }));
      server.on('connection', (socket: net.Socket) => {
        try {
          onLink(new TcpLink(socket, log));
        } catch (err) {
          log.error('onLink threw; dropping the connection', { error: (err as Error).message });
          socket.destroy();
        }
      });

      const bound = server.address() as net.AddressInfo;
      let closed: Promise<void> | undefined;
      const listener: TransportListener = {
        address: formatHostPort(bound.address, bound.port),
        close() {
          closed ??= new Promise<void>((resolve) => {
            ctx.signal.removeEventListener('abort', onAbort);
            listeners.delete(listener);
            // server.close() stops accepting at once; its callback would wait for
            // every accepted link to end, which is not what "close the listener" means.
            server.close();
            setImmediate(resolve);
          });
          return closed;
        },
      };
      const onAbort = () => void listener.close();
      ctx.signal.addEventListener('abort', onAbort, { once: true });
      listeners.add(listener);
      log.debug('listening', { address: listener.address });
      return listener;
    };

    const dial = (address: string, signal?: AbortSignal): Promise<Link> => {
      const { host, port } = parseHostPort(address, 'server address');
      const shown = formatHostPort(host, port);
      const signals = signal ? [signal, ctx.signal] : [ctx.signal];
      const aborted = signals.find((s) => s.aborted);
      if (aborted) return Promise.reject(abortError(aborted));

      return new Promise<Link>((resolve, reject) => {
        // The socket reads into the reader's memory (onread), so records arrive whole;
        // Node offers this only for sockets it creates, so accepted ones read 'data'.
        // Nothing is read before 'connect' has made the link and paused the socket.
        let link: TcpLink | undefined;
        const reader = new RecordReader((record) => link?.receive(record));
        const socket = net.connect({
          host,
          port,
          noDelay: true,
          keepAlive,
          keepAliveInitialDelay: keepAliveMs,
          onread: onreadInto(reader),
        });
        const unreachable = (reason: string, text: string, cause?: unknown) =>
          new DshieldError(ErrorCodes.UNREACHABLE, `cannot reach the server at ${shown}: ${text}`, {
            cause,
            detail: { reason, address: shown },
          });
        const settle = (err?: Error) => {
          clearTimeout(timer);
          for (const s of signals) s.removeEventListener('abort', onAbort);
          socket.removeListener('error', onError);
          socket.removeListener('connect', onConnect);
          if (err) {
            socket.destroy();
            reject(err);
          }
        };
        const onConnect = () => {
          // The link attaches its own error listener before ours is removed.
          link = new TcpLink(socket, log, reader);
          settle();
          resolve(link);
        };
        const onError = (err: NodeJS.ErrnoException) => {
          const { reason, text } = describeDialError(err, host);
          settle(unreachable(reason, text, err));
        };
        const onAbort = function (this: AbortSignal) {
          settle(abortError(this));
        };
        const timer = setTimeout(
          () => settle(unreachable('timeout', `no connection within ${connectTimeout} ms`)),
          connectTimeout,
        );
        for (const s of signals) s.addEventListener('abort', onAbort, { once: true });
        socket.once('connect', onConnect);
        socket.on('error', onError);
      });
    };

    return {
      name: 'tcp',
      type: 'stream',
      listen,
      dial,
      async close() {
        await Promise.all([...listeners].map((l) => l.close()));
      },
    };
  },
});
