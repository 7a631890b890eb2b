/**
 * Reading a TUN queue on the main thread's event loop, for packets that come
 * one at a time.
 *
 * Why: a packet read by the queue's pump worker reaches the main thread only
 * after two thread wake-ups (the pump leaves poll, then wakes the main
 * thread), and waking an idle thread costs 0.1-0.4 ms here. A ping crossed
 * two such hand-offs per round trip, one per side. Read by libuv's epoll on
 * the main thread, the packet costs one wake-up, as in a single-threaded VPN
 * (measured on a loopback TUN echo: p50 RTT 0.15-0.19 ms against 0.35-0.50 ms
 * through the pump). Under load the pump reads instead (device.ts switches), so the
 * read syscalls stay on the other core.
 *
 * How: Node has no public API to watch a character device; libuv's pipe
 * handle reads any non-blocking fd, and a TUN fd hands out exactly one
 * packet per read(2), so each read callback is one whole packet. The handle
 * is `process.binding('pipe_wrap').Pipe` wrapped in a net.Socket with a
 * caller-owned read buffer (`onread`: no allocation per packet). That binding
 * is deprecated for general use; when it is missing or refuses the fd,
 * `openMainReader` returns undefined and the pump reads everything, as before.
 *
 * The handle owns a dup of the fd (libuv closes what it holds), so closing
 * the reader never closes the fd device.ts and the pump share.
 */
import net from 'node:net';
import { F_DUPFD_CLOEXEC, libc } from './libc.ts';
import { tunHeaderLength } from './queue-io.ts';

export interface MainReader {
  /** Start (or go on) reading; every packet goes to onPacket until it returns false. Idempotent. */
  start(): void;
  /** Release the handle and its dup of the fd. Idempotent. */
  close(): void;
}

export interface MainReaderHandlers {
  /**
   * One whole packet, a view of the reader's buffer valid only during the
   * call. Return false to stop reading before the next one (nothing queued
   * in the kernel is lost; start() goes on).
   */
  onPacket(packet: Buffer): boolean;
  /** The fd failed; the reader has stopped for good and closed itself. */
  onError(err: Error): void;
}

interface PipeBinding {
  Pipe: new (type: number) => { open(fd: number): number; close(): void };
  constants: { SOCKET: number };
}

function pipeBinding(): PipeBinding | undefined {
  try {
    const binding = (process as unknown as { binding(name: string): unknown }).binding('pipe_wrap') as PipeBinding;
    return typeof binding?.Pipe === 'function' ? binding : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A reader for `fd` (an O_NONBLOCK TUN queue fd), created stopped, or
 * undefined when this Node cannot watch the fd on its event loop.
 * `maxPacket` sizes the read buffer (a longer packet would be truncated).
 */
export function openMainReader(fd: number, maxPacket: number, handlers: MainReaderHandlers): MainReader | undefined {
  const binding = pipeBinding();
  if (!binding) return undefined;
  const c = libc();
  const own = c.fcntlInt(fd, F_DUPFD_CLOEXEC, 3);
  if (own < 0) return undefined;
  const handle = new binding.Pipe(binding.constants.SOCKET);
  if (handle.open(own) !== 0) {
    c.close(own);
    return undefined;
  }
  const header = tunHeaderLength(fd);
  const buffer = Buffer.allocUnsafe(header + maxPacket);
  let closed = false;
  let reading = false;
  const socket = new net.Socket({
    handle,
    readable: true,
    writable: false,
    manualStart: true,
    onread: {
      buffer,
      callback: (n: number, buf: Uint8Array) => {
        // Each read is one packet, behind the device's vnet header if it has one (see device.ts).
        if (n <= header) return true;
        const more = handlers.onPacket(Buffer.from(buf.buffer, buf.byteOffset + header, n - header));
        if (!more) reading = false;
        return more;
      },
    },
  } as net.SocketConstructorOpts);
  const fail = (err: Error) => {
    if (closed) return;
    close();
    handlers.onError(err);
  };
  socket.on('error', fail);
  // A TUN fd never reads 0 bytes; if it ever did, libuv would take it for EOF and stop.
  socket.on('end', () => fail(new Error('the TUN fd reported end of file')));

  function close(): void {
    if (closed) return;
    closed = true;
    reading = false;
    socket.destroy();
  }

  return {
    start() {
      if (closed || reading) return;
      reading = true;
      socket.resume();
    },
    close,
  };
}
