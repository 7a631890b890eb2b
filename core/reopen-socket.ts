/**
 * An accepted TCP socket made again as one that reads with net.Socket's
 * `onread`, which Node offers only for sockets it makes itself (connect,
 * or `new Socket({ fd })`), never for those a net.Server accepts.
 *
 * Why: without `onread` every read lands in fresh malloc memory (64 KiB),
 * freed only when a scavenge collects its Buffer. The SOCKS5 proxy's
 * socket from an application that uploads reads hundreds of megabytes a
 * second that way. Reading it into reused memory (core/pooled-reads.ts),
 * as the server's dialed sockets of a download already are, took the
 * client's CPU for a 512 MiB upload through SOCKS5 over tcp from
 * 0.98-1.03 to 0.87-0.91 s, and the upload from 359-381 to 400-422 MB/s
 * (alternating rounds in one sitting).
 *
 * How: the accepted socket's descriptor (its handle's `fd`) is duplicated
 * (fcntl F_DUPFD_CLOEXEC, through koffi), a new net.Socket is made over
 * the duplicate with `onread` (both documented options of the
 * constructor), and the accepted one is destroyed. That closes only its
 * own descriptor: the connection, its options (TCP_NODELAY, keepalive)
 * and anything the kernel has queued live on in the duplicate.
 *
 * Rules for the caller:
 * - Reopen at accept, before the accepted socket is read or written (the
 *   server made with pauseOnConnect), or later from its 'data' handler,
 *   once the chunk is consumed: the accepted socket is destroyed in the
 *   same turn, so no read on it completes after the last chunk it gave.
 *   A socket with data in either of its buffers is not reopened.
 * - The new socket is not the server's: server.close() does not wait for
 *   it and server.getConnections() does not count it; the caller tracks and
 *   ends it.
 * - It starts paused, as pauseOnConnect leaves an accepted socket.
 *
 * Where it cannot be done (not Linux, koffi missing, a socket without a
 * descriptor) `reopenWithOnread` returns null and the caller keeps the
 * accepted socket, with Node's own reads.
 */
import { Socket, type OnReadOpts, type SocketConstructorOpts } from 'node:net';
import { F_DUPFD_CLOEXEC, libc } from './tun/libc.ts';

/** Node's handle of a socket: `fd` is its descriptor (-1 or absent where there is none). */
interface HandleWithFd {
  fd?: number;
}

/** What a socket reads straight into: memory for the next read, and how much the socket put there. */
export interface InPlaceReader {
  readBuffer(): Buffer;
  wrote(n: number): void;
}

/** net.Socket's `onread` that feeds `reader` (a dialed socket's, or one made again here). */
export function onreadInto(reader: InPlaceReader): OnReadOpts {
  return {
    buffer: () => reader.readBuffer(),
    callback: (n: number) => {
      reader.wrote(n);
      return true;
    },
  };
}

/**
 * A new socket over the connection of `accepted` that reads through
 * `onread`, with `accepted` destroyed; null (and `accepted` untouched)
 * where that cannot be done (see the rules above).
 */
export function reopenWithOnread(accepted: Socket, onread: OnReadOpts, options: { allowHalfOpen?: boolean } = {}): Socket | null {
  // The one undocumented read: the descriptor of Node's handle. Where it is missing, nothing changes.
  const fd = (accepted as unknown as { _handle?: HandleWithFd | null })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0 || accepted.readableLength > 0 || accepted.writableLength > 0 || accepted.destroyed) return null;
  let copy: number;
  try {
    copy = libc().fcntlInt(fd, F_DUPFD_CLOEXEC, 0);
  } catch {
    return null; // no libc through koffi here: Node's reads it is
  }
  if (copy < 0) return null;
  // `onread` is a documented option of the constructor too; @types/node (20) lists it for connect only.
  const made: SocketConstructorOpts & { onread: OnReadOpts } = {
    fd: copy,
    readable: true,
    writable: true,
    allowHalfOpen: options.allowHalfOpen ?? false,
    onread,
  };
  let socket: Socket;
  try {
    socket = new Socket(made);
  } catch {
    libc().close(copy);
    return null;
  }
  // It starts reading at once; paused in the same turn, before any read can complete.
  socket.pause();
  accepted.destroy();
  return socket;
}

/**
 * A 'data' chunk at least this large (Node reads up to 64 KiB at a time)
 * found that much waiting in the kernel: bulk data, not a message.
 */
const BULK_CHUNK = 32 * 1024;
/** Such chunks in a row that make a socket a bulk one (BulkReads). */
const BULK_READS = 4;

/**
 * Tells from an accepted socket's 'data' chunks when it has come to carry
 * bulk data (BULK_READS chunks of BULK_CHUNK or more in a row), so that it
 * is reopened only then: a socket that carries handshakes and small
 * messages never pays for the second socket and the read memory. A transport's server links use it:
 * reopened at accept, every link had cost that, and the handshakes per
 * server CPU-second fell from ~3,370 to ~2,050.
 */
export class BulkReads {
  private bulkChunks = 0;
  private possible = true;

  constructor(socket: Socket) {
    // A TLS socket's descriptor carries the encrypted stream: never read it in place of TLS.
    if ((socket as Socket & { encrypted?: boolean }).encrypted === true) this.possible = false;
  }

  /** After a chunk of `length` bytes: whether to reopen the socket now. */
  due(length: number): boolean {
    if (length < BULK_CHUNK) {
      this.bulkChunks = 0;
      return false;
    }
    return this.possible && ++this.bulkChunks >= BULK_READS;
  }

  /**
   * `socket` made again to read into `reader` (reopenWithOnread, keeping its
   * half-open setting), or null, which failed() then accounts for.
   */
  reopen(socket: Socket, reader: InPlaceReader): Socket | null {
    const made = reopenWithOnread(socket, onreadInto(reader), { allowHalfOpen: socket.allowHalfOpen });
    if (made === null) this.failed(socket);
    return made;
  }

  /**
   * reopenWithOnread gave null for `socket`: bytes in its buffers keep it
   * from happening now (tried again after the next bulk chunks); anything
   * else (no descriptor, no koffi) for good.
   */
  failed(socket: Socket): void {
    this.bulkChunks = 0;
    this.possible = socket.writableLength > 0 || socket.readableLength > 0;
  }
}
