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
 *   server made with pauseOnConnect). A socket with data in either of its
 *   buffers is not reopened.
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
