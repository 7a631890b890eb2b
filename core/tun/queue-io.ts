/**
 * Packet I/O on one TUN queue fd, for a thread that may block: read and write
 * one IP packet per call, and wait (poll) until the fd is readable or another
 * thread wakes us through an eventfd. The device is opened with IFF_VNET_HDR
 * where the kernel takes it (device.ts): every read and write then carries a
 * virtio_net_hdr first, which these calls take off and put on, so a run of
 * TCP segments can be written as one packet (tcp-coalesce.ts). Where it was
 * refused, reads and writes are plain packets; `headerLength` says which, and
 * callers keep the same layout either way (room for a header before each
 * packet, left unused).
 *
 * This is the building block for worker threads: the pump behind openTun's
 * main-thread API (queue-worker.ts) uses it, and so can a later worker that
 * seals and sends packets itself (see device.ts `openTunQueues`). Calls are
 * direct syscalls through koffi: no libuv threadpool, no Error object per
 * EAGAIN, ~25 ns of FFI overhead per call on top of the syscall itself.
 *
 * The fd must be O_NONBLOCK (openTunQueues opens it so): `read` returns 0 when
 * nothing is queued instead of blocking, so a reader can drain everything that
 * is there and hand it over as one batch.
 */
import { DshieldError, ErrorCodes } from '../errors.ts';
import { EAGAIN, EINTR } from '../errno.ts';
import { ViewOf } from '../view-of.ts';
import { MAX_IP_PACKET, VNET_HDR_LEN } from './tcp-coalesce.ts';
import { EFD_CLOEXEC, EFD_NONBLOCK, IFF_VNET_HDR, IFNAMSIZ, IFREQ_SIZE, POLLERR, POLLHUP, POLLIN, POLLNVAL, TUNGETIFF, libc, type Libc } from './libc.ts';

export type WaitResult = 'readable' | 'woken' | 'timeout';

/**
 * How many bytes of virtio_net_hdr come before each packet on the TUN fd
 * `fd`: VNET_HDR_LEN when its device has IFF_VNET_HDR, 0 when not (the
 * kernel refused it, device.ts). An fd that is not a TUN device (a test's
 * or a warm-up's stand-in) is taken to carry one, as openTunQueues asks.
 */
export function tunHeaderLength(fd: number): number {
  const req = new Uint8Array(IFREQ_SIZE);
  if (libc().ioctlPtr(fd, TUNGETIFF, req) < 0) return VNET_HDR_LEN;
  const flags = req[IFNAMSIZ]! | (req[IFNAMSIZ + 1]! << 8);
  return (flags & IFF_VNET_HDR) !== 0 ? VNET_HDR_LEN : 0;
}

export class TunQueueIo {
  readonly fd: number;
  readonly wakeFd: number;
  /** Bytes of virtio_net_hdr before each packet on the fd: VNET_HDR_LEN, or 0 on a device without IFF_VNET_HDR. */
  readonly headerLength: number;
  private readonly c: Libc;
  private readonly pollfds = new Uint8Array(16);
  private readonly pollView: DataView;
  private readonly scratch8 = new Uint8Array(8);
  /** Where write() puts a packet behind its header (made at the first write: most users only read). */
  private framedBuffer: Uint8Array | undefined;
  /** The views read() and writeAt() hand to the kernel: a thread reads into one place and writes from one. */
  private readonly readView = new ViewOf();
  private readonly writeView = new ViewOf();

  /** `wakeFd`: an eventfd from `createWakeFd()` that `wake()` signals; `headerLength`: asked of the device unless given. */
  constructor(fd: number, wakeFd: number, headerLength = tunHeaderLength(fd)) {
    this.fd = fd;
    this.wakeFd = wakeFd;
    this.headerLength = headerLength;
    this.c = libc();
    this.pollView = new DataView(this.pollfds.buffer);
  }

  /**
   * Read one packet so that it starts at `at` of `buf`: the VNET_HDR_LEN
   * bytes before it take the device's virtio_net_hdr, if it has one (at >=
   * VNET_HDR_LEN either way; the device asks for no offloads, so the kernel
   * hands over plain whole packets and the header says nothing to act on).
   * A packet longer than the rest of `buf` is truncated by the kernel.
   * Returns the packet's length, or 0 when none is queued. Throws
   * DshieldError(TUN) on a real error (e.g. the device was removed).
   */
  read(buf: Uint8Array, at: number): number {
    const header = this.headerLength;
    const frame = this.readView.from(buf, at - header);
    for (;;) {
      const n = this.c.read(this.fd, frame, frame.length);
      if (n >= 0) return n > header ? n - header : 0;
      const e = this.c.errno();
      if (e === EAGAIN) return 0;
      if (e === EINTR) continue;
      throw new DshieldError(ErrorCodes.TUN, `reading the TUN device failed: ${this.c.errnoName(e)}`, { detail: { errno: e } });
    }
  }

  /**
   * Write one whole IP packet (copied behind a header that asks nothing of
   * the kernel, on a device that has one). False when the kernel refused it
   * (malformed packet: EINVAL; device down: EIO): the packet is dropped, as
   * a NIC would.
   */
  write(packet: Uint8Array): boolean {
    if (this.headerLength === 0) return this.writeFrame(packet);
    if (packet.length > this.framed.length - VNET_HDR_LEN) return false; // longer than any IP packet
    this.framed.set(packet, VNET_HDR_LEN);
    return this.writeFrame(this.framed.subarray(0, VNET_HDR_LEN + packet.length));
  }

  /** Write the packet of `length` bytes at `at` of `buf` in place (at >= VNET_HDR_LEN); the header, if any, is written over the bytes before it. */
  writeAt(buf: Uint8Array, at: number, length: number): boolean {
    const header = this.headerLength;
    for (let i = at - header; i < at; i++) buf[i] = 0;
    return this.writeFrame(this.writeView.from(buf, at - header), header + length);
  }

  /**
   * One whole write of `frame`'s first `length` bytes: a packet behind the
   * device's header if it has one (a TcpCoalescer's frame needs one), else a
   * plain packet. False, with nothing written, for a length past the
   * frame's end.
   */
  writeFrame(frame: Uint8Array, length = frame.length): boolean {
    // The kernel is handed an address and a length: never more than the memory there.
    if (!(length >= 0 && length <= frame.length)) return false;
    for (;;) {
      const n = this.c.write(this.fd, frame, length);
      if (n >= 0) return true;
      if (this.c.errno() !== EINTR) return false;
    }
  }

  private get framed(): Uint8Array {
    return (this.framedBuffer ??= new Uint8Array(VNET_HDR_LEN + MAX_IP_PACKET));
  }

  /** errno of the last failed read/write on this thread. */
  lastErrno(): number {
    return this.c.errno();
  }

  /**
   * Block until the TUN fd is readable (only if `forRead`), the wake fd was
   * signalled, or `timeoutMs` passed (-1: no limit). A wake is consumed here.
   */
  wait(forRead: boolean, timeoutMs = -1): WaitResult {
    const v = this.pollView;
    v.setInt32(0, forRead ? this.fd : -1, true); // a negative fd is ignored by poll
    v.setInt16(4, POLLIN, true);
    v.setInt16(6, 0, true);
    v.setInt32(8, this.wakeFd, true);
    v.setInt16(12, POLLIN, true);
    v.setInt16(14, 0, true);
    const n = this.c.poll(this.pollfds, 2, timeoutMs);
    if (n < 0) {
      const e = this.c.errno();
      if (e === EINTR) return 'timeout';
      throw new DshieldError(ErrorCodes.TUN, `poll on the TUN device failed: ${this.c.errnoName(e)}`);
    }
    if (n === 0) return 'timeout';
    const tunEvents = v.getInt16(6, true);
    const wakeEvents = v.getInt16(14, true);
    if (wakeEvents & POLLIN) {
      this.c.read(this.wakeFd, this.scratch8, 8); // reset the counter
      return 'woken';
    }
    if (tunEvents & (POLLERR | POLLHUP | POLLNVAL)) {
      throw new DshieldError(ErrorCodes.TUN, 'the TUN device went away');
    }
    return 'readable';
  }
}

/** A non-blocking, close-on-exec eventfd to wake a thread blocked in `TunQueueIo.wait`. */
export function createWakeFd(): number {
  const c = libc();
  const fd = c.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0) throw new DshieldError(ErrorCodes.TUN, `eventfd failed: ${c.errnoName(c.errno())}`);
  return fd;
}

const ONE = new Uint8Array([1, 0, 0, 0, 0, 0, 0, 0]);

/** Wake the thread waiting on `wakeFd` (from any thread). Cheap to call twice: wakes coalesce. */
export function wake(wakeFd: number): void {
  libc().write(wakeFd, ONE, 8);
}
