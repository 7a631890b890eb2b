/**
 * Packet I/O on one TUN queue fd, for a thread that may block: read and write
 * one IP packet per call, and wait (poll) until the fd is readable or another
 * thread wakes us through an eventfd.
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
import { EFD_CLOEXEC, EFD_NONBLOCK, POLLERR, POLLHUP, POLLIN, POLLNVAL, libc, type Libc } from './libc.ts';

export type WaitResult = 'readable' | 'woken' | 'timeout';

export class TunQueueIo {
  readonly fd: number;
  readonly wakeFd: number;
  private readonly c: Libc;
  private readonly pollfds = new Uint8Array(16);
  private readonly pollView: DataView;
  private readonly scratch8 = new Uint8Array(8);

  /** `wakeFd`: an eventfd from `createWakeFd()` that `wake()` signals. */
  constructor(fd: number, wakeFd: number) {
    this.fd = fd;
    this.wakeFd = wakeFd;
    this.c = libc();
    this.pollView = new DataView(this.pollfds.buffer);
  }

  /**
   * Read one packet into `into` (which should hold the MTU; a longer packet
   * is truncated by the kernel). Returns its length, or 0 when none is queued.
   * Throws DshieldError(TUN) on a real error (e.g. the device was removed).
   */
  read(into: Uint8Array): number {
    for (;;) {
      const n = this.c.read(this.fd, into, into.length);
      if (n >= 0) return n;
      const e = this.c.errno();
      if (e === EAGAIN) return 0;
      if (e === EINTR) continue;
      throw new DshieldError(ErrorCodes.TUN, `reading the TUN device failed: ${this.c.errnoName(e)}`, { detail: { errno: e } });
    }
  }

  /**
   * Write one whole IP packet. False when the kernel refused it (malformed
   * packet: EINVAL; device down: EIO): the packet is dropped, as a NIC would.
   */
  write(packet: Uint8Array): boolean {
    for (;;) {
      const n = this.c.write(this.fd, packet, packet.length);
      if (n >= 0) return true;
      if (this.c.errno() !== EINTR) return false;
    }
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
