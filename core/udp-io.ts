/**
 * Datagram I/O on a node:dgram IPv4 socket's own fd, through koffi:
 * sendto(2) and recvfrom(2) called directly, without blocking.
 *
 * Why: node:dgram spends more on each datagram than the kernel does. A send
 * builds a SendWrap, parses the address text, and calls back on the next
 * tick; a receive mallocs a 64 KiB buffer, builds an address object and
 * enters JavaScript through MakeCallback. Measured on loopback (1457-byte
 * datagrams, CPU per datagram): send 9-11 µs through dgram against 4 µs
 * with sendto here; receive 9-12 µs against 6 µs. In TUN mode over udp
 * every packet is one datagram sent and one received, so this is a large
 * share of a packet's cost.
 *
 * The socket stays node:dgram's: it binds, reports errors, closes the fd,
 * and still wakes the event loop when datagrams arrive; this module only
 * moves bytes. The caller must stop using it before the socket is closed,
 * as the fd number may then be reused.
 *
 * Only IPv4 sockets get one: the sender's address is formatted here, and
 * "a.b.c.d:port" is the one spelling that needs no care to match dgram's.
 * Anywhere else (another OS, no koffi, a udp6 socket, a Node without the
 * handle's fd) `openUdpIo` returns undefined and the caller keeps dgram.
 */
import type dgram from 'node:dgram';
import { createRequire } from 'node:module';
import { endianness } from 'node:os';
import { errnoNames } from './errno.ts';

type Koffi = typeof import('koffi');

const MSG_DONTWAIT = 0x40;
const AF_INET = 2;
const SOCKADDR_IN_SIZE = 16;
/** Sender addresses remembered as text (a server hears from many peers); cleared when full. */
const ADDRESS_TEXT_LIMIT = 4096;

export interface UdpIo {
  /**
   * sendto(2) of the whole `datagram` to `to` (from `sockaddrIn`), without
   * blocking: 0 when the kernel took it, else the errno (EAGAIN or ENOBUFS:
   * the socket's send buffer is full; anything else: this datagram failed).
   * The kernel has copied the datagram when this returns.
   */
  send(datagram: Uint8Array, to: Uint8Array): number;
  /**
   * recvfrom(2) of one queued datagram into `buf`, without blocking: its
   * length, or -1 when none is queued or the read failed. A datagram longer
   * than `buf` is cut short (give it 64 KiB to get any). After a read,
   * `from` is the sender as "a.b.c.d:port".
   */
  receive(buf: Uint8Array): number;
  /** The sender of the last datagram `receive` returned. */
  readonly from: string;
  /** An Error for an errno `send` returned, with `code` set to its name ("EPERM"). */
  error(errno: number): NodeJS.ErrnoException;
}

interface Calls {
  sendto(fd: number, buf: Uint8Array, len: number, flags: number, addr: Uint8Array, addrlen: number): number;
  recvfrom(fd: number, buf: Uint8Array, len: number, flags: number, addr: Uint8Array, addrlen: Uint32Array): number;
  errno(): number;
  names: Map<number, string>;
}

let calls: Calls | null | undefined;

/** koffi's libc bindings, made once per process; null where they cannot be. */
function bindCalls(): Calls | null {
  if (calls !== undefined) return calls;
  calls = null;
  if (process.platform !== 'linux') return calls;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as Koffi;
    const lib = koffi.load('libc.so.6');
    const sendto = lib.func('long sendto(int fd, const void *buf, unsigned long len, int flags, const void *addr, unsigned int addrlen)');
    const recvfrom = lib.func('long recvfrom(int fd, void *buf, unsigned long len, int flags, void *addr, void *addrlen)');
    const names = errnoNames(koffi);
    calls = {
      sendto: sendto as Calls['sendto'],
      recvfrom: recvfrom as Calls['recvfrom'],
      errno: () => koffi.errno() as number,
      names,
    };
  } catch {
    calls = null;
  }
  return calls;
}

interface UdpHandle {
  fd?: unknown;
  recvStart?: () => number;
  recvStop?: () => number;
}

/**
 * node:dgram's handle of a socket. dgram keeps it in an internal state
 * object under a symbol; `socket._handle` is the same handle, but reading it
 * prints a deprecation warning (DEP0112).
 */
function dgramHandle(socket: dgram.Socket): UdpHandle | undefined {
  for (const key of Object.getOwnPropertySymbols(socket)) {
    const handle = (socket as unknown as Record<symbol, { handle?: UdpHandle } | undefined>)[key]?.handle;
    if (handle !== undefined && handle !== null && typeof handle === 'object' && 'fd' in handle) return handle;
  }
  return undefined;
}

/** The fd of a bound dgram socket. */
export function dgramFd(socket: dgram.Socket): number | undefined {
  const fd = dgramHandle(socket)?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/**
 * Stop (false) or restart (true) node:dgram's reading of a bound socket,
 * through its handle's recvStop/recvStart. False when that cannot be done.
 */
export function setDgramReading(socket: dgram.Socket, on: boolean): boolean {
  const handle = dgramHandle(socket);
  const call = on ? handle?.recvStart : handle?.recvStop;
  if (typeof call !== 'function') return false;
  try {
    return call.call(handle) === 0;
  } catch {
    return false;
  }
}

const littleEndian = endianness() === 'LE';

/** struct sockaddr_in for an IPv4 address ("a.b.c.d") and port, or undefined if `host` is not one. */
export function sockaddrIn(host: string, port: number): Buffer | undefined {
  const parts = host.split('.');
  if (parts.length !== 4 || !Number.isInteger(port) || port < 0 || port > 65535) return undefined;
  const sa = Buffer.alloc(SOCKADDR_IN_SIZE);
  // sin_family is in host byte order; the port and address in network order.
  if (littleEndian) sa.writeUInt16LE(AF_INET, 0);
  else sa.writeUInt16BE(AF_INET, 0);
  sa.writeUInt16BE(port, 2);
  for (let i = 0; i < 4; i++) {
    const text = parts[i]!;
    const octet = Number(text);
    if (!/^\d{1,3}$/.test(text) || octet > 255) return undefined;
    sa[4 + i] = octet;
  }
  return sa;
}

/** Direct I/O on `socket` (bound, IPv4), or undefined where it is not available (see above). */
export function openUdpIo(socket: dgram.Socket): UdpIo | undefined {
  const c = bindCalls();
  if (c === null) return undefined;
  let fd: number | undefined;
  try {
    fd = socket.address().family === 'IPv4' ? dgramFd(socket) : undefined;
  } catch {
    fd = undefined;
  }
  if (fd === undefined) return undefined;
  return udpIoOnFd(fd);
}

/**
 * Direct I/O on an IPv4 UDP socket's fd (one this thread may use: a dup of a
 * dgram socket's fd in a worker, for one), or undefined where koffi cannot
 * load. The fd must stay open while the result is in use.
 */
export function udpIoOnFd(fd: number): UdpIo | undefined {
  const c = bindCalls();
  return c === null ? undefined : new FdUdpIo(fd, c);
}

/**
 * A class, not an object of closures: every instance shares its methods, so
 * code V8 optimized on one socket (a packet thread warms its path up on a
 * socket of its own) stays valid on the next.
 */
class FdUdpIo implements UdpIo {
  private readonly sockaddr = Buffer.alloc(SOCKADDR_IN_SIZE);
  private readonly sockaddrLength = new Uint32Array(1);
  private readonly texts = new Map<number, string>();
  private last = '';

  constructor(
    private readonly fd: number,
    private readonly c: Calls,
  ) {}

  send(datagram: Uint8Array, to: Uint8Array): number {
    return this.c.sendto(this.fd, datagram, datagram.length, MSG_DONTWAIT, to, to.length) < 0 ? this.c.errno() : 0;
  }

  receive(buf: Uint8Array): number {
    const sockaddr = this.sockaddr;
    this.sockaddrLength[0] = SOCKADDR_IN_SIZE;
    const n = this.c.recvfrom(this.fd, buf, buf.length, MSG_DONTWAIT, sockaddr, this.sockaddrLength);
    if (n < 0) return -1;
    // One number per sender (address and port) finds its text without building a string.
    const key = sockaddr.readUInt32BE(4) * 65536 + sockaddr.readUInt16BE(2);
    let text = this.texts.get(key);
    if (text === undefined) {
      text = `${sockaddr[4]}.${sockaddr[5]}.${sockaddr[6]}.${sockaddr[7]}:${sockaddr.readUInt16BE(2)}`;
      if (this.texts.size >= ADDRESS_TEXT_LIMIT) this.texts.clear();
      this.texts.set(key, text);
    }
    this.last = text;
    return n;
  }

  get from(): string {
    return this.last;
  }

  error(code: number): NodeJS.ErrnoException {
    const name = this.c.names.get(code) ?? `errno ${code}`;
    return Object.assign(new Error(`sendto failed: ${name}`), { code: name, errno: -code, syscall: 'sendto' });
  }
}
