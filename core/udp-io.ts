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
import { ENOPROTOOPT, errnoNames } from './errno.ts';

type Koffi = typeof import('koffi');

const littleEndian = endianness() === 'LE';
const MSG_DONTWAIT = 0x40;
const SOL_UDP = 17;
const UDP_SEGMENT = 103;
/**
 * struct cmsghdr on 64-bit little-endian Linux: cmsg_len (size_t),
 * cmsg_level (int), cmsg_type (int), then the data, padded to 8 bytes:
 * CMSG_LEN(2) = 18 and CMSG_SPACE(2) = 24 for UDP_SEGMENT's u16.
 */
const LP64_CMSG = (process.arch === 'x64' || process.arch === 'arm64') && littleEndian;
const CMSG_HEADER = 16;
const SEGMENT_CMSG_SPACE = 24;
const AF_INET = 2;
const SOCKADDR_IN_SIZE = 16;
/** Sender addresses remembered as text (a server hears from many peers); cleared when full. */
const ADDRESS_TEXT_LIMIT = 4096;

export interface UdpIo {
  /**
   * sendto(2) of `datagram`'s first `length` bytes (all of it by default)
   * to `to` (from `sockaddrIn`), without blocking: 0 when the kernel took
   * it, else the errno (EAGAIN or ENOBUFS: the socket's send buffer is full;
   * anything else: this datagram failed). The kernel has copied the datagram
   * when this returns. A RangeError for a length past the datagram's end.
   */
  send(datagram: Uint8Array, to: Uint8Array, length?: number): number;
  /**
   * recvfrom(2) of one queued datagram into `buf`, without blocking: its
   * length, or -1 when none is queued or the read failed. A datagram longer
   * than `buf` is cut short (give it 64 KiB to get any). After a read,
   * `from` is the sender as "a.b.c.d:port".
   */
  receive(buf: Uint8Array): number;
  /** The sender of the last datagram `receive` returned. */
  readonly from: string;
  /**
   * Whether `sendSegments` may be tried: on x86-64 and arm64 (little
   * endian), whose struct cmsghdr this module lays out itself.
   */
  readonly canSendSegments: boolean;
  /**
   * One sendmsg(2) with UDP_SEGMENT (UDP GSO, Linux 4.18+): the first
   * `length` bytes of `buf` leave as datagrams of `segmentSize` bytes each
   * (the last may be shorter) to `to`, without blocking. The kernel builds
   * the datagrams and passes them down the stack as one packet until it
   * must split them. 0 when the kernel took them all, else the errno (none
   * was sent): EAGAIN or ENOBUFS as for `send`; EMSGSIZE or EINVAL (by
   * kernel version) for a segment the path MTU does not fit; EIO where the
   * route's device cannot offload checksums; others where the kernel has no
   * UDP GSO.
   */
  sendSegments(buf: Uint8Array, length: number, segmentSize: number, to: Uint8Array): number;
  /** An Error for an errno `send` returned, with `code` set to its name ("EPERM"). */
  error(errno: number): NodeJS.ErrnoException;
}

interface Iovec {
  iov_base: Uint8Array;
  iov_len: number;
}

interface MsgHdr {
  msg_name: Uint8Array;
  msg_namelen: number;
  msg_iov: Iovec[];
  msg_iovlen: number;
  msg_control: Uint8Array;
  msg_controllen: number;
  msg_flags: number;
}

interface Calls {
  /** Null where UDP_SEGMENT's control message is not laid out as LP64_CMSG says. */
  sendmsg: ((fd: number, msg: MsgHdr, flags: number) => number) | null;
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
    let sendmsg: Calls['sendmsg'] = null;
    if (LP64_CMSG) {
      const iovec = koffi.struct({ iov_base: 'void *', iov_len: 'size_t' });
      const msghdr = koffi.struct({
        msg_name: 'void *',
        msg_namelen: 'uint32_t',
        msg_iov: koffi.pointer(iovec),
        msg_iovlen: 'size_t',
        msg_control: 'void *',
        msg_controllen: 'size_t',
        msg_flags: 'int',
      });
      sendmsg = lib.func('sendmsg', 'long', ['int', koffi.pointer(msghdr), 'int']) as Calls['sendmsg'];
    }
    calls = {
      sendmsg,
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
  /**
   * The last datagram's sender as one number (see receive). NaN until the
   * first: a double from the start, as every sender's number is, so V8
   * never has to change how the field is stored (and throw away the code
   * that reads it).
   */
  private lastKey = NaN;
  /** sockaddr for the numbers in it (not Buffer's methods: bytes.ts). */
  private readonly sockaddrView = new DataView(this.sockaddr.buffer, this.sockaddr.byteOffset, SOCKADDR_IN_SIZE);
  /**
   * sendSegments' message, made once; each call sets the address, the
   * buffer and its length (the two buffers here are placeholders until
   * then) and the segment size.
   */
  private readonly segmentCmsg = Buffer.alloc(SEGMENT_CMSG_SPACE);
  private readonly iov: Iovec = { iov_base: this.segmentCmsg, iov_len: 0 };
  private readonly msg: MsgHdr = {
    msg_name: this.sockaddr,
    msg_namelen: SOCKADDR_IN_SIZE,
    msg_iov: [this.iov],
    msg_iovlen: 1,
    msg_control: this.segmentCmsg,
    msg_controllen: SEGMENT_CMSG_SPACE,
    msg_flags: 0,
  };
  readonly canSendSegments: boolean;

  constructor(
    private readonly fd: number,
    private readonly c: Calls,
  ) {
    this.canSendSegments = c.sendmsg !== null;
    const cmsg = this.segmentCmsg;
    cmsg.writeBigUInt64LE(BigInt(CMSG_HEADER + 2), 0);
    cmsg.writeInt32LE(SOL_UDP, 8);
    cmsg.writeInt32LE(UDP_SEGMENT, 12);
  }

  send(datagram: Uint8Array, to: Uint8Array, length = datagram.length): number {
    // The kernel is handed an address and a length: never more than the memory there.
    if (!(length >= 0 && length <= datagram.length)) throw new RangeError(`a ${length}-byte send from ${datagram.length} bytes`);
    return this.c.sendto(this.fd, datagram, length, MSG_DONTWAIT, to, to.length) < 0 ? this.c.errno() : 0;
  }

  sendSegments(buf: Uint8Array, length: number, segmentSize: number, to: Uint8Array): number {
    const sendmsg = this.c.sendmsg;
    if (sendmsg === null) return ENOPROTOOPT;
    const msg = this.msg;
    msg.msg_name = to;
    msg.msg_namelen = to.length;
    this.iov.iov_base = buf;
    this.iov.iov_len = length;
    this.segmentCmsg.writeUInt16LE(segmentSize, CMSG_HEADER);
    return sendmsg(this.fd, msg, MSG_DONTWAIT) < 0 ? this.c.errno() : 0;
  }

  receive(buf: Uint8Array): number {
    const sockaddr = this.sockaddr;
    this.sockaddrLength[0] = SOCKADDR_IN_SIZE;
    const n = this.c.recvfrom(this.fd, buf, buf.length, MSG_DONTWAIT, sockaddr, this.sockaddrLength);
    if (n < 0) return -1;
    // One number per sender (address and port) finds its text without building a string; most datagrams come from the last sender.
    const view = this.sockaddrView;
    const port = view.getUint16(2);
    const key = view.getUint32(4) * 65536 + port;
    if (key === this.lastKey) return n;
    let text = this.texts.get(key);
    if (text === undefined) {
      text = `${sockaddr[4]}.${sockaddr[5]}.${sockaddr[6]}.${sockaddr[7]}:${port}`;
      if (this.texts.size >= ADDRESS_TEXT_LIMIT) this.texts.clear();
      this.texts.set(key, text);
    }
    this.last = text;
    this.lastKey = key;
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
