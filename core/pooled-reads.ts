/**
 * A TCP socket whose reads land in reused memory (net.Socket's `onread`)
 * instead of a fresh 64 KiB buffer per read: one dialed with connectPooled,
 * or an accepted one reopened with reopenPooled (core/reopen-socket.ts).
 *
 * Why: Node reads every chunk of a socket into new malloc memory that lives
 * until a scavenge frees its JavaScript object. A server relaying a download
 * at 300 MB/s makes ~27 MB of those between scavenges, so its malloc heap
 * grows by that much during the first transfer and every new page is a page
 * fault (~9,000 per GiB on the bench's first download, and on a VM that
 * shadows page tables each one is dear). With reads into a few buffers that
 * come back once their data has been framed, the same download touches the
 * same memory again and again.
 *
 * How memory is held:
 * - A socket whose last read filled its buffer (a bulk transfer) reads next
 *   into a buffer from the pool. Its data goes to the consumer as a view,
 *   with a `release` to call once the view is no longer read; the buffer
 *   then returns to the pool. A view never released is never reused: the
 *   garbage collector takes it as it takes Node's own buffers.
 * - A socket whose last read came short (idle, or small messages) reads
 *   next into one landing buffer shared by the process, and that read's data
 *   is copied out before the consumer sees it. So an idle socket holds no
 *   read memory of its own, as with Node's reads (the 10,000-idle-streams
 *   budget counts on that).
 *
 * Until a sink is attached the socket is an ordinary Duplex: reads are
 * pushed to its readable side ('data' events, pipe, read()), reading stops
 * at its high-water mark, and attaching a sink hands it what was buffered
 * first. So an outbound plugin can return one to any consumer (the outbound
 * contract is a plain Duplex), and the server's splice takes the pooled path.
 */
import { connect, type TcpNetConnectOpts, type Socket } from 'node:net';
import { reopenWithOnread } from './reopen-socket.ts';
import type { Duplex } from 'node:stream';

/** Node's own read size for stream sockets. */
const READ_SIZE = 64 * 1024;
/** Free buffers kept for reuse: enough for a few bulk streams at once (1 MiB). */
const MAX_FREE = 16;

/**
 * Takes one read's data. `release` is null when the data is the consumer's
 * to keep (a copy); otherwise call it once, when the data is no longer read
 * (for a write, in its callback). Return false to stop reading until the
 * socket's `resume()`.
 */
export type PooledSink = (data: Buffer, release: (() => void) | null) => boolean;

const free: Buffer[] = [];
const landing = Buffer.allocUnsafeSlow(READ_SIZE);
let made = 0;
const readers = new WeakMap<Duplex, PooledReader>();

/** net.connect with pooled reads: an ordinary socket until attachPooledSink gives its data a sink (then no more 'data' events). */
export function connectPooled(options: Omit<TcpNetConnectOpts, 'onread'>): Socket {
  const reader = new PooledReader();
  // onread first: V8 (Node 20) takes a slow path of ~1-2 µs for `{ ...options, more }`, not for `{ more, ...options }`.
  const socket = connect({ onread: { buffer: reader.nextBuffer, callback: reader.onRead }, ...options });
  reader.socket = socket;
  readers.set(socket, reader);
  return socket;
}

/**
 * An accepted socket, reopened to read through the pool (at accept, before
 * it was read: see core/reopen-socket.ts for the rules), and paused; or
 * `accepted` itself where it cannot be reopened. Either way an ordinary
 * socket until attachPooledSink gives it a sink.
 */
export function reopenPooled(accepted: Socket, options: { allowHalfOpen?: boolean } = {}): Socket {
  const reader = new PooledReader();
  const socket = reopenWithOnread(accepted, { buffer: reader.nextBuffer, callback: reader.onRead }, options);
  if (socket === null) return accepted;
  reader.socket = socket;
  readers.set(socket, reader);
  return socket;
}

/**
 * Sends a pooled socket's data to `sink`, beginning with what its readable
 * side holds, and starts it reading unless the sink said to stop. False (and
 * nothing done) if the stream does not read through a pool.
 */
export function attachPooledSink(stream: Duplex, sink: PooledSink): boolean {
  const reader = readers.get(stream);
  if (!reader) return false;
  reader.attach(sink);
  return true;
}

/** For tests and diagnostics: pool buffers ever made, and those free now. */
export function pooledReadStats(): { made: number; free: number } {
  return { made, free: free.length };
}

class PooledReader {
  socket: Socket | null = null;
  private sink: PooledSink | null = null;
  private lastFull = false;

  /** Node asks for the next read's memory once when the socket opens, then after every read. */
  readonly nextBuffer = (): Buffer => (this.lastFull ? take() : landing);

  readonly onRead = (n: number, buf: Uint8Array): boolean => {
    this.lastFull = n === buf.length;
    let data: Buffer;
    let release: (() => void) | null;
    if (buf === landing) {
      data = Buffer.allocUnsafe(n);
      landing.copy(data, 0, 0, n);
      release = null;
    } else {
      const owned = buf as Buffer;
      data = owned.subarray(0, n);
      release = releaser(owned);
    }
    if (this.sink) return this.sink(data, release);
    // No sink: an ordinary stream read; the data is the reader's to keep, and a full buffer stops reading.
    return this.socket!.push(data);
  };

  attach(sink: PooledSink): void {
    this.sink = sink;
    const socket = this.socket!;
    let reading = true;
    for (let chunk: Buffer | null; (chunk = socket.read() as Buffer | null) !== null; ) reading = sink(chunk, null) && reading;
    if (reading) socket.resume();
  }
}

function take(): Buffer {
  const buf = free.pop();
  if (buf) return buf;
  made++;
  return Buffer.allocUnsafeSlow(READ_SIZE);
}

/** Hands `buf` back at most once, however often the returned function runs. */
function releaser(buf: Buffer): () => void {
  let out = true;
  return () => {
    if (!out) return;
    out = false;
    if (free.length < MAX_FREE) free.push(buf);
  };
}
