/**
 * The few libc calls TUN mode needs that Node does not offer: ioctl (to
 * create the device and set its MTU), poll, eventfd, fcntl (dup), and
 * read/write that report EAGAIN as a return value instead of a thrown Error;
 * and for a packet thread's warm-up, sockets of its own (socketpair, bind,
 * getsockname). Outside TUN mode, fcntl alone: core/reopen-socket.ts
 * duplicates an accepted socket's descriptor with it.
 *
 * Loaded lazily through koffi (an FFI with prebuilt binaries), so a
 * process that needs none of it never loads it, and non-Linux systems
 * never do. Safe to call from any thread: each worker that calls `libc()`
 * gets its own bindings.
 */
import { createRequire } from 'node:module';
import { DshieldError, ErrorCodes } from '../errors.ts';
import { errnoNames } from '../errno.ts';

type Koffi = typeof import('koffi');

export interface Libc {
  /** ioctl(fd, request, arg) with a pointer argument; returns -1 and sets errno on failure. */
  ioctlPtr(fd: number, request: number, arg: Uint8Array): number;
  /** read(2) into `buf` (from its first byte): bytes read, 0 at EOF, -1 with errno. */
  read(fd: number, buf: Uint8Array, len: number): number;
  /** write(2) of the first `len` bytes of `buf`: bytes written or -1 with errno. */
  write(fd: number, buf: Uint8Array, len: number): number;
  /** poll(2) over an array of struct pollfd (8 bytes each); returns -1 with errno on failure. */
  poll(fds: Uint8Array, nfds: number, timeoutMs: number): number;
  /** eventfd(2): a counter fd used to wake a thread blocked in poll. */
  eventfd(initval: number, flags: number): number;
  socket(domain: number, type: number, protocol: number): number;
  /** socketpair(2): the two fds in `fds`; -1 with errno on failure. */
  socketpair(domain: number, type: number, protocol: number, fds: Int32Array): number;
  /** bind(2) to the address in `addr` (a struct sockaddr); -1 with errno on failure. */
  bind(fd: number, addr: Uint8Array, addrlen: number): number;
  /** getsockname(2) into `addr`; `addrlen[0]` is its size before and the address's length after. */
  getsockname(fd: number, addr: Uint8Array, addrlen: Uint32Array): number;
  close(fd: number): number;
  /** fcntl(fd, cmd, arg) with an int argument (F_DUPFD_CLOEXEC); -1 with errno on failure. */
  fcntlInt(fd: number, cmd: number, arg: number): number;
  /** errno of the last failed call on this thread. */
  errno(): number;
  /** The symbolic name of an errno value ("EPERM"), or "errno N". */
  errnoName(code: number): string;
}

/** Linux ioctl numbers and flags (asm-generic encoding: x86, arm, arm64, riscv). */
export const TUNSETIFF = 0x400454ca;
export const TUNGETIFF = 0x800454d2;
export const SIOCSIFMTU = 0x8922;
export const SIOCGIFMTU = 0x8921;
export const IFF_TUN = 0x0001;
export const IFF_NO_PI = 0x1000;
/** Every read and write on the fd starts with a struct virtio_net_hdr (tcp-coalesce.ts). */
export const IFF_VNET_HDR = 0x4000;
export const IFF_MULTI_QUEUE = 0x0100;
/** With TUNSETIFF: fail with EBUSY instead of attaching to an existing device of that name. */
export const IFF_TUN_EXCL = 0x8000;
export const IFNAMSIZ = 16;
/** sizeof(struct ifreq) on 64-bit Linux; 32 on 32-bit, so 40 covers both. */
export const IFREQ_SIZE = 40;
export const POLLIN = 0x001;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLNVAL = 0x020;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
export const AF_UNIX = 1;
export const AF_INET = 2;
export const SOCK_DGRAM = 2;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
/** fcntl: duplicate to the lowest free fd >= arg, close-on-exec. */
export const F_DUPFD_CLOEXEC = 1030;

/** Architectures whose ioctl numbers match the constants above. */
const GENERIC_IOCTL_ARCHES = new Set(['x64', 'arm64', 'arm', 'ia32', 'riscv64', 'loong64']);

let cached: Libc | undefined;

/**
 * The libc bindings for this thread. Throws DshieldError(UNSUPPORTED) on a
 * system other than Linux, on an architecture whose ioctl numbers differ,
 * or when koffi cannot be loaded.
 */
export function libc(): Libc {
  if (cached) return cached;
  if (process.platform !== 'linux') {
    throw new DshieldError(ErrorCodes.UNSUPPORTED, `TUN mode needs Linux; this system is ${process.platform}`);
  }
  if (!GENERIC_IOCTL_ARCHES.has(process.arch)) {
    throw new DshieldError(ErrorCodes.UNSUPPORTED, `TUN mode is not supported on the ${process.arch} architecture`);
  }
  let koffi: Koffi;
  try {
    koffi = createRequire(import.meta.url)('koffi') as Koffi;
  } catch (err) {
    throw new DshieldError(
      ErrorCodes.UNSUPPORTED,
      `TUN mode needs the koffi package (npm install; its install script must be allowed): ${(err as Error).message}`,
      { cause: err },
    );
  }
  const lib = koffi.load('libc.so.6');
  const ioctl = lib.func('int ioctl(int fd, unsigned long request, ...)');
  const read = lib.func('long read(int fd, void *buf, unsigned long count)');
  const write = lib.func('long write(int fd, const void *buf, unsigned long count)');
  const poll = lib.func('int poll(void *fds, unsigned long nfds, int timeout)');
  const eventfd = lib.func('int eventfd(unsigned int initval, int flags)');
  const socket = lib.func('int socket(int domain, int type, int protocol)');
  const socketpair = lib.func('int socketpair(int domain, int type, int protocol, void *sv)');
  const bind = lib.func('int bind(int fd, const void *addr, unsigned int addrlen)');
  const getsockname = lib.func('int getsockname(int fd, void *addr, void *addrlen)');
  const close = lib.func('int close(int fd)');
  const fcntl = lib.func('int fcntl(int fd, int cmd, ...)');
  const names = errnoNames(koffi);
  cached = {
    ioctlPtr: (fd, request, arg) => ioctl(fd, request, 'void *', arg) as number,
    read: (fd, buf, len) => read(fd, buf, len) as number,
    write: (fd, buf, len) => write(fd, buf, len) as number,
    poll: (fds, nfds, timeoutMs) => poll(fds, nfds, timeoutMs) as number,
    eventfd: (initval, flags) => eventfd(initval, flags) as number,
    socket: (domain, type, protocol) => socket(domain, type, protocol) as number,
    socketpair: (domain, type, protocol, fds) => socketpair(domain, type, protocol, fds) as number,
    bind: (fd, addr, addrlen) => bind(fd, addr, addrlen) as number,
    getsockname: (fd, addr, addrlen) => getsockname(fd, addr, addrlen) as number,
    close: (fd) => close(fd) as number,
    fcntlInt: (fd, cmd, arg) => fcntl(fd, cmd, 'int', arg) as number,
    errno: () => koffi.errno(),
    errnoName: (code) => names.get(code) ?? `errno ${code}`,
  };
  return cached;
}
