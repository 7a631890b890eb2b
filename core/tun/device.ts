/**
 * A Linux TUN device: IP packets in and out of the kernel's network stack.
 *
 * `openTunQueues` opens /dev/net/tun once per queue and attaches each fd to
 * one device with the TUNSETIFF ioctl (IFF_TUN | IFF_NO_PI | IFF_VNET_HDR,
 * plus IFF_MULTI_QUEUE when queues > 1: the kernel then spreads flows over
 * the fds). It returns raw fds, for a caller that runs its own worker per
 * queue (read, seal, send in one thread) with TunQueueIo (queue-io.ts).
 * Every read and write on them starts with a virtio_net_hdr: it lets a
 * writer hand the kernel a run of one TCP flow's segments as one packet
 * (tcp-coalesce.ts). No offloads are asked for reading (TUNSETOFFLOAD), so
 * what the kernel hands over is always one plain, checksummed packet. A
 * kernel that refuses IFF_VNET_HDR (EINVAL: a sandbox's own network stack
 * may) gets a device without it: plain packets both ways, each written on
 * its own, a little slower under bulk TCP and otherwise the same.
 *
 * `openTun` adds a main-thread API on top: one pump worker per queue moves
 * packets between the fd and the main thread through shared-memory rings
 * (ring.ts), so the main event loop never blocks on the device and pays
 * neither a syscall nor a message per packet. Writes are queued into a
 * bounded ring: `write` says when to back off, memory never grows.
 *
 * Packets that come one at a time skip the pump, because a hand-off between
 * threads costs a wake-up (0.1-0.4 ms): the main thread reads the fd on its
 * own event loop (main-reader.ts) until BURST packets come within a
 * millisecond, then hands reading to the pump, which hands it back after
 * PUMP_HAND_BACK_MS of quiet; and write() writes packets itself until BURST
 * of them come within a millisecond, then queues them for the pump for as
 * long as every millisecond brings that many.
 *
 * The device is not persistent: when the last fd closes (close(), or the
 * process dies however it dies) the kernel removes it, with its addresses
 * and routes.
 */
import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { DshieldError, ErrorCodes } from '../errors.ts';
import {
  AF_INET,
  IFF_MULTI_QUEUE,
  IFF_NO_PI,
  IFF_TUN,
  IFF_VNET_HDR,
  IFF_TUN_EXCL,
  IFNAMSIZ,
  IFREQ_SIZE,
  SIOCSIFMTU,
  SOCK_CLOEXEC,
  SOCK_DGRAM,
  TUNSETIFF,
  libc,
} from './libc.ts';
import { openMainReader, type MainReader } from './main-reader.ts';
import {
  CTRL_ENDED,
  CTRL_ERRNO,
  CTRL_READER,
  CTRL_SLOTS,
  CTRL_STOP,
  CTRL_TX_ERRORS,
  CTRL_TX_MERGED,
  READER_MAIN,
  READER_PUMP,
  READER_PUMP_ONLY,
  type PumpData,
} from './pump-protocol.ts';
import { createWakeFd, TunQueueIo, wake } from './queue-io.ts';
import { PacketRing } from './ring.ts';
import { startTsWorker } from './ts-worker.ts';
import { BurstMeter, TUN_BURST } from './burst-meter.ts';
import { VNET_HDR_LEN } from './tcp-coalesce.ts';
import type { TunReaderHooks, TunReaderLoan } from '../types.ts';

export const DEFAULT_TUN_NAME = 'dshield%d';
/** What a TUN user logs when the device came without a vnet header. */
export const NO_VNET_HEADER_NOTE = 'this kernel refused IFF_VNET_HDR on the TUN device: packets are written into it one by one (bulk TCP a little slower, nothing else changes)';
/** The kernel's limit for multi-queue TUN devices. */
export const MAX_TUN_QUEUES = 256;
const TUN_PATH = '/dev/net/tun';

export interface TunOptions {
  /** Interface name, or a pattern with one %d the kernel fills in. Default "dshield%d". */
  name?: string;
  /** Number of queues (fds); > 1 makes a multi-queue device. Default 1. */
  queues?: number;
  /** MTU to set (68..65535). Default: leave the kernel's (1500). */
  mtu?: number;
  /**
   * Ask for IFF_VNET_HDR (merged TCP writes). Default true, and the device
   * is made without it where the kernel refuses it; false never asks.
   */
  vnetHeader?: boolean;
}

export interface TunQueues {
  /** The interface name the kernel gave the device. */
  readonly name: string;
  /** One O_NONBLOCK, close-on-exec fd per queue. */
  readonly fds: readonly number[];
  /** The MTU set, or 1500 when left alone. */
  readonly mtu: number;
  /** Whether every read and write on the fds carries a virtio_net_hdr (see above). */
  readonly vnetHeader: boolean;
  /** Close every fd the caller still owns; the device disappears with the last. Idempotent. */
  close(): void;
}

const NAME_RE = /^[A-Za-z0-9_.-]*(%d)?[A-Za-z0-9_.-]*$/;

function validate(opts: TunOptions): { name: string; queues: number; mtu: number | undefined } {
  const name = opts.name ?? DEFAULT_TUN_NAME;
  const queues = opts.queues ?? 1;
  if (name.length === 0 || Buffer.byteLength(name) >= IFNAMSIZ || !NAME_RE.test(name) || name === '.' || name === '..') {
    throw new DshieldError(ErrorCodes.TUN, `invalid TUN device name "${name}": 1-15 letters, digits, "_.-", with at most one %d`);
  }
  if (!Number.isInteger(queues) || queues < 1 || queues > MAX_TUN_QUEUES) {
    throw new DshieldError(ErrorCodes.TUN, `TUN queues must be an integer from 1 to ${MAX_TUN_QUEUES}, got ${queues}`);
  }
  const mtu = opts.mtu;
  if (mtu !== undefined && (!Number.isInteger(mtu) || mtu < 68 || mtu > 65535)) {
    throw new DshieldError(ErrorCodes.TUN, `TUN MTU must be an integer from 68 to 65535, got ${mtu}`);
  }
  return { name, queues, mtu };
}

function needRoot(what: string, code: string): DshieldError {
  return new DshieldError(ErrorCodes.TUN, `TUN mode needs root (or CAP_NET_ADMIN) and ${TUN_PATH}: ${what}: ${code}`, {
    detail: { errno: code },
  });
}

function openQueueFd(): number {
  try {
    return openSync(TUN_PATH, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? 'error';
    if (code === 'ENOENT' || code === 'ENXIO' || code === 'ENODEV') {
      throw new DshieldError(
        ErrorCodes.TUN,
        `TUN mode needs ${TUN_PATH}, which is missing here (${code}): load the tun module (modprobe tun), or in a container pass --device /dev/net/tun`,
        { cause: err, detail: { errno: code } },
      );
    }
    if (code === 'EACCES' || code === 'EPERM') throw needRoot(`open ${TUN_PATH}`, code);
    throw new DshieldError(ErrorCodes.TUN, `cannot open ${TUN_PATH}: ${(err as Error).message}`, { cause: err, detail: { errno: code } });
  }
}

function ifreq(name: string): Buffer {
  const req = Buffer.alloc(IFREQ_SIZE);
  req.write(name, 0, IFNAMSIZ - 1, 'latin1');
  return req;
}

function ifreqName(req: Buffer): string {
  const end = req.indexOf(0);
  return req.toString('latin1', 0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end);
}

function attach(fd: number, name: string, flags: number): string {
  const c = libc();
  const req = ifreq(name);
  req.writeUInt16LE(flags, IFNAMSIZ);
  if (c.ioctlPtr(fd, TUNSETIFF, req) < 0) {
    const e = c.errnoName(c.errno());
    if (e === 'EPERM' || e === 'EACCES') throw needRoot('TUNSETIFF', e);
    if (e === 'EBUSY' || e === 'EEXIST') {
      throw new DshieldError(ErrorCodes.TUN, `a network device named "${name}" already exists; choose another TUN name`, { detail: { errno: e } });
    }
    throw new DshieldError(ErrorCodes.TUN, `creating TUN device "${name}" failed (TUNSETIFF): ${e}`, { detail: { errno: e } });
  }
  return ifreqName(req);
}

/** Set the MTU with SIOCSIFMTU on a throwaway socket (no `ip` process needed). */
export function setMtu(name: string, mtu: number): void {
  const c = libc();
  const sock = c.socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (sock < 0) throw new DshieldError(ErrorCodes.TUN, `socket() failed: ${c.errnoName(c.errno())}`);
  try {
    const req = ifreq(name);
    req.writeInt32LE(mtu, IFNAMSIZ);
    if (c.ioctlPtr(sock, SIOCSIFMTU, req) < 0) {
      const e = c.errnoName(c.errno());
      if (e === 'EPERM' || e === 'EACCES') throw needRoot(`set MTU on ${name}`, e);
      throw new DshieldError(ErrorCodes.TUN, `setting MTU ${mtu} on ${name} failed: ${e}`, { detail: { errno: e } });
    }
  } finally {
    c.close(sock);
  }
}

/**
 * Create the device and return one fd per queue. Throws DshieldError:
 * UNSUPPORTED off Linux; TUN without /dev/net/tun, without root or
 * CAP_NET_ADMIN, for a bad option, or when the name is taken.
 */
export function openTunQueues(opts: TunOptions = {}): TunQueues {
  const { name: wanted, queues, mtu } = validate(opts);
  libc(); // UNSUPPORTED before touching anything on a system that cannot do this
  const fds: number[] = [];
  let open = true;
  const closeAll = () => {
    if (!open) return;
    open = false;
    for (const fd of fds) closeQuietly(fd);
  };
  try {
    let flags = IFF_TUN | IFF_NO_PI | (opts.vnetHeader === false ? 0 : IFF_VNET_HDR) | (queues > 1 ? IFF_MULTI_QUEUE : 0);
    let name = wanted;
    for (let i = 0; i < queues; i++) {
      const fd = openQueueFd();
      fds.push(fd);
      // The first queue must create a new device (EXCL: never join a device
      // someone else made); the others attach to it by its real name, with
      // the same flags (the kernel refuses a queue whose flags differ).
      if (i > 0) {
        name = attach(fd, name, flags);
        continue;
      }
      try {
        name = attach(fd, name, flags | IFF_TUN_EXCL);
      } catch (err) {
        if ((flags & IFF_VNET_HDR) === 0 || (err as DshieldError).detail?.errno !== 'EINVAL') throw err;
        flags &= ~IFF_VNET_HDR;
        name = attach(fd, name, flags | IFF_TUN_EXCL);
      }
    }
    if (mtu !== undefined) setMtu(name, mtu);
    return { name, fds, mtu: mtu ?? 1500, vnetHeader: (flags & IFF_VNET_HDR) !== 0, close: closeAll };
  } catch (err) {
    closeAll();
    throw err;
  }
}

// ---------------------------------------------------------------------------
// The main-thread API.

export interface TunStats {
  /** Packets delivered to onPacket. */
  rxPackets: number;
  /** Of those, packets the main thread read itself (packets coming one at a time). */
  rxDirect: number;
  /** Packets accepted by write(). */
  txPackets: number;
  /** Of those, packets the main thread wrote itself (packets coming one at a time). */
  txDirect: number;
  /** Packets write() dropped because the queue was full. */
  txDropped: number;
  /** Packets the kernel refused (malformed, device down). */
  txErrors: number;
  /** Of txPackets, those the pumps wrote as part of the run of TCP segments before them, in one write (tcp-coalesce.ts). */
  txMerged: number;
}

export interface TunDevice {
  readonly name: string;
  readonly queues: number;
  readonly mtu: number;
  /** False where the kernel refused IFF_VNET_HDR (see openTunQueues): packets are then written one by one, never merged. */
  readonly vnetHeader: boolean;
  /**
   * Receive every packet the kernel routes into the device: one whole IPv4 or
   * IPv6 packet per call, without a packet-info header. `packet` is a view of
   * shared memory valid only during the call: copy what must outlive it.
   * Packets wait (bounded; then the kernel drops) until a handler is set.
   * `alone` is true for a packet the main thread read by itself (no other
   * follows in this turn) and false for those a pump read in a batch.
   */
  onPacket(handler: (packet: Buffer, alone: boolean) => void): void;
  /** After write() returned false: there is room again. */
  onDrain(handler: () => void): void;
  /** The device failed (removed from outside, a pump died). The device is closed after this. */
  onError(handler: (err: DshieldError) => void): void;
  /**
   * The first queue's fd, for a thread that writes packets into the device
   * itself (Session.offloadPackets): it must use a dup, which keeps the
   * device alive until closed. Valid until close().
   */
  readonly fd: number;
  /**
   * Lend the first queue's reading of lone packets to another thread (see
   * TunReaderLoan), in place of the main thread's event loop. Undefined when
   * the main thread does not read that queue itself, or it is lent already.
   */
  lendReader(hooks: TunReaderHooks): TunReaderLoan | undefined;
  /**
   * Queue one whole IP packet for the kernel (copied; the caller may reuse
   * `packet`). Returns false when the caller should stop until onDrain; a
   * packet that did not fit is dropped (counted in stats().txDropped), as a NIC would.
   */
  write(packet: Uint8Array): boolean;
  stats(): TunStats;
  /** Stop the pumps and close the fds; resolves when the kernel has removed the device. Idempotent. */
  close(): Promise<void>;
}

export interface OpenTunOptions extends TunOptions {
  /**
   * Bytes of each queue's ring in each direction (default 1 MiB). The
   * receive ring is at least 256 KiB (it must hold a 64 KiB read); the
   * send ring at least 4 KiB, and then takes packets up to half its size.
   */
  ringBytes?: number;
  /**
   * Let the main thread read packets that come one at a time (lower
   * latency; see main-reader.ts). Default true; false: the pumps read all.
   */
  mainThreadReads?: boolean;
}

// Atomics.waitAsync is in Node 20 (V8) but not in the ES2022 lib typings.
const waitAsync = (
  Atomics as unknown as {
    waitAsync(ta: Int32Array, index: number, value: number): { async: false; value: string } | { async: true; value: Promise<string> };
  }
).waitAsync;

function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // already closed
  }
}

/** Packets delivered per queue per event-loop turn before yielding to other I/O. */
const DELIVER_PER_TURN = 1024;

interface QueueState {
  index: number;
  rx: PacketRing;
  tx: PacketRing;
  ctrl: Int32Array;
  wakeFd: number;
  fd: number;
  flushScheduled: boolean;
  txBlocked: boolean;
  /** The main thread's own handle on the fd, for packets written directly (see write()). */
  direct: TunQueueIo;
  /** Writes to this queue: busy when they come in bursts (then through the pump). */
  writes: BurstMeter;
  /** Reads the fd on the main event loop while CTRL_READER is READER_MAIN; undefined: the pump always reads. */
  reader: MainReader | undefined;
  /** Reads by the main thread: a burst hands reading to the pump. */
  reads: BurstMeter;
  /** Another thread reads in the main thread's place (lendReader); the reader above is closed meanwhile. */
  lent: TunReaderHooks | undefined;
  exited: Promise<void>;
  /** The pump's last words, when it ended on an error. */
  endReason?: string;
}

/**
 * Create the device (see openTunQueues) and start one pump worker per queue.
 * Rejects with the same DshieldErrors as openTunQueues.
 */
export async function openTun(opts: OpenTunOptions = {}): Promise<TunDevice> {
  const tun = openTunQueues(opts);
  const ringBytes = opts.ringBytes ?? 1 << 20;
  // Read size: the MTU is the most the kernel hands us, unless someone
  // raises it later with `ip link`; 65535 never truncates.
  const maxPacket = 65535;
  const queues: QueueState[] = [];
  const workers: import('node:worker_threads').Worker[] = [];
  let packetHandler: ((packet: Buffer, alone: boolean) => void) | undefined;
  let drainHandler: (() => void) | undefined;
  let errorHandler: ((err: DshieldError) => void) | undefined;
  let closing = false;
  let closedPromise: Promise<void> | undefined;
  const stats = { rxPackets: 0, rxDirect: 0, txPackets: 0, txDirect: 0, txDropped: 0 };
  /** Packets the kernel refused when written directly (the pumps count theirs in CTRL_TX_ERRORS). */
  let directTxErrors = 0;

  try {
    for (let i = 0; i < tun.fds.length; i++) {
      const wakeFd = createWakeFd();
      const rx = PacketRing.create(Math.max(ringBytes, 4 * maxPacket));
      const tx = PacketRing.create(ringBytes);
      const ctrlSab = new SharedArrayBuffer(CTRL_SLOTS * 4);
      const ctrl = new Int32Array(ctrlSab);
      const q: QueueState = {
        index: i,
        rx,
        tx,
        ctrl,
        wakeFd,
        fd: tun.fds[i]!,
        flushScheduled: false,
        txBlocked: false,
        direct: new TunQueueIo(tun.fds[i]!, wakeFd),
        writes: new BurstMeter(TUN_BURST),
        reader: undefined,
        reads: new BurstMeter(TUN_BURST),
        lent: undefined,
        exited: Promise.resolve(),
      };
      if (opts.mainThreadReads !== false) q.reader = openMainReader(q.fd, maxPacket, { onPacket: (p) => readDirect(q, p), onError: () => handToPump(q) });
      Atomics.store(ctrl, CTRL_READER, q.reader ? READER_MAIN : READER_PUMP_ONLY);
      queues.push(q);
      const data: PumpData = { fd: tun.fds[i]!, wakeFd, maxPacket, rx: rx.sab, tx: tx.sab, ctrl: ctrlSab };
      // The main thread keeps owning both fds (see close()).
      const worker = startTsWorker(new URL('./queue-worker.ts', import.meta.url), { workerData: data, name: `tun-${tun.name}-q${i}` });
      workers.push(worker);
      q.exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    }
    // A worker that cannot start (loader, koffi) fails here, not later.
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve, reject) => {
            w.once('message', () => resolve());
            w.once('error', reject);
            w.once('exit', (code) => reject(new Error(`the pump exited during start-up (code ${code})`)));
          }),
      ),
    );
  } catch (err) {
    for (const q of queues) {
      q.reader?.close();
      Atomics.store(q.ctrl, CTRL_STOP, 1);
      wake(q.wakeFd);
    }
    // Pumps that did start end on STOP; one that failed to load has ended already.
    await Promise.race([Promise.all(queues.map((q) => q.exited)), new Promise((r) => setTimeout(r, 2_000).unref())]);
    for (const q of queues) closeQuietly(q.wakeFd);
    tun.close();
    throw err instanceof DshieldError ? err : new DshieldError(ErrorCodes.TUN, `starting the TUN pump failed: ${(err as Error).message}`, { cause: err });
  }

  const fail = (err: DshieldError) => {
    if (closing) return;
    void close();
    if (errorHandler) errorHandler(err);
    else queueMicrotask(() => {
      throw err; // nobody listens: a device that silently stopped would be worse
    });
  };

  // A pump that ends while the device is open (device removed from outside,
  // a bug, the thread killed) fails the device. Its last message (the
  // reason) is delivered before its 'exit'.
  for (const [i, w] of workers.entries()) {
    const q = queues[i]!;
    w.on('message', (m: unknown) => {
      if (m && typeof m === 'object' && 'error' in m) q.endReason = String((m as { error: unknown }).error);
    });
    w.on('error', (err) => {
      q.endReason ??= err.message;
    });
    w.once('exit', () => {
      if (closing) return;
      const errno = Atomics.load(q.ctrl, CTRL_ERRNO);
      const why = q.endReason ?? (errno > 0 ? `errno ${errno}` : 'its pump thread ended');
      fail(new DshieldError(ErrorCodes.TUN, `TUN device ${tun.name} failed (queue ${i}): ${why}`, { detail: { errno } }));
    });
  }

  /** One packet to the handler: a Buffer view (the handler's type), valid during the call. */
  const deliverBuffer = (packet: Buffer, alone: boolean) => {
    stats.rxPackets++;
    try {
      packetHandler!(packet, alone);
    } catch (err) {
      // A throwing handler is a bug in our code, not the network's: report it, keep the device.
      if (errorHandler) errorHandler(new DshieldError(ErrorCodes.INTERNAL, `TUN packet handler threw: ${(err as Error).message}`, { cause: err }));
      else queueMicrotask(() => {
        throw err;
      });
    }
  };
  /** A packet from a pump's ring (a view of shared memory), behind room for the device's vnet header (used or not). */
  const deliver = (record: Uint8Array) => deliverBuffer(Buffer.from(record.buffer, record.byteOffset + VNET_HDR_LEN, record.length - VNET_HDR_LEN), false);

  /** A packet the main thread read itself; false when it handed reading to the pump. */
  function readDirect(q: QueueState, packet: Buffer): boolean {
    stats.rxDirect++;
    // One read, one packet: nothing else comes in this turn, so it need not wait to share a record.
    deliverBuffer(packet, true);
    if (!q.reads.tick(performance.now())) return true;
    // Coming fast: the pump's core does the reads. This thread reads no more
    // (the reader stops before its next read), so the order is kept.
    Atomics.store(q.ctrl, CTRL_READER, READER_PUMP);
    wake(q.wakeFd);
    return false;
  }

  /** The main reader failed: the pump reads from now on (and reports the fd's error if it is real). */
  function handToPump(q: QueueState): void {
    q.reader = undefined;
    Atomics.store(q.ctrl, CTRL_READER, READER_PUMP_ONLY);
    wake(q.wakeFd);
  }

  const checkDrain = (q: QueueState) => {
    if (q.txBlocked && q.tx.free >= q.tx.capacity / 2) {
      q.txBlocked = false;
      drainHandler?.();
    }
  };

  const pump = (q: QueueState) => {
    if (closing) return;
    if (Atomics.load(q.ctrl, CTRL_ENDED) !== 0) return; // its 'exit' handler reports why
    const seq = Atomics.load(q.rx.int32, PacketRing.SEQ_INDEX);
    if (packetHandler) {
      q.rx.consume(deliver, DELIVER_PER_TURN);
      if (q.rx.takeProducerWaiting()) wake(q.wakeFd);
      // The pump handed reading back: what it read is delivered, so this thread may go on.
      if (!q.rx.hasData && Atomics.load(q.ctrl, CTRL_READER) === READER_MAIN) {
        if (q.reader) q.reader.start();
        else q.lent?.wake();
      }
    }
    checkDrain(q);
    if (packetHandler && q.rx.hasData) {
      setImmediate(pump, q);
      return;
    }
    if (packetHandler && !q.rx.prepareToWait()) {
      setImmediate(pump, q);
      return;
    }
    if (!packetHandler) q.rx.prepareToWait();
    const r = waitAsync(q.rx.int32, PacketRing.SEQ_INDEX, seq);
    if (r.async) void r.value.then(() => pump(q));
    else setImmediate(pump, q);
  };
  for (const q of queues) pump(q);

  const flush = (q: QueueState) => {
    q.flushScheduled = false;
    if (closing) return;
    if (q.tx.publish()) wake(q.wakeFd);
  };

  const pickQueue = (p: Uint8Array): QueueState => {
    if (queues.length === 1) return queues[0]!;
    // Keep one address pair on one queue (in order): xor of address bytes.
    let h = 0;
    const v = p.length > 0 ? p[0]! >> 4 : 0;
    if (v === 4 && p.length >= 20) h = p[12]! ^ p[13]! ^ p[14]! ^ p[15]! ^ p[16]! ^ p[17]! ^ p[18]! ^ p[19]!;
    else if (v === 6 && p.length >= 40) h = p[22]! ^ p[23]! ^ p[38]! ^ p[39]!;
    return queues[h % queues.length]!;
  };

  const write = (packet: Uint8Array): boolean => {
    if (closing) return false;
    const q = pickQueue(packet);
    const busy = q.writes.tick(performance.now());
    // Packets that come one at a time are written from here: handing one to
    // the pump costs a wake-up of an idle thread (0.1-0.4 ms measured). With
    // nothing queued (the pump publishes the ring's tail only after writing
    // its batch) order is kept. A stream of packets goes through the ring, so
    // the pump's core does those syscalls.
    if (!busy && !q.flushScheduled && !q.tx.hasData) {
      if (q.direct.write(packet)) {
        stats.txPackets++;
        stats.txDirect++;
      } else directTxErrors++;
      return true;
    }
    const ok = q.tx.push(packet);
    if (!q.flushScheduled) {
      q.flushScheduled = true;
      queueMicrotask(() => flush(q));
    }
    if (ok) stats.txPackets++;
    else stats.txDropped++;
    if (!ok || q.tx.free < q.tx.capacity / 4) {
      q.txBlocked = true;
      q.tx.markProducerWaiting();
      // The pump may have emptied the ring before it could see the flag.
      if (q.tx.free >= q.tx.capacity / 2) setImmediate(checkDrain, q);
      return false;
    }
    return true;
  };

  function close(): Promise<void> {
    if (closedPromise) return closedPromise;
    closing = true;
    for (const q of queues) {
      const lent = q.lent;
      q.lent = undefined;
      lent?.revoke();
      q.reader?.close();
      Atomics.store(q.ctrl, CTRL_STOP, 1);
      wake(q.wakeFd);
    }
    // The pumps end on STOP; only then are the fds closed (the main thread
    // owns them), so no thread ever uses an fd number after it was reused.
    closedPromise = Promise.all(queues.map((q) => q.exited)).then(() => {
      for (const q of queues) {
        closeQuietly(q.fd);
        closeQuietly(q.wakeFd);
      }
    });
    return closedPromise;
  }

  return {
    name: tun.name,
    queues: queues.length,
    mtu: tun.mtu,
    vnetHeader: tun.vnetHeader,
    fd: tun.fds[0]!,
    lendReader(hooks) {
      const q = queues[0]!;
      if (closing || q.reader === undefined || q.lent !== undefined) return undefined;
      q.reader.close();
      q.reader = undefined;
      q.lent = hooks;
      return {
        fd: q.fd,
        ctrl: q.ctrl.buffer as SharedArrayBuffer,
        pumpWakeFd: q.wakeFd,
        giveBack() {
          if (q.lent !== hooks) return;
          q.lent = undefined;
          if (closing) return;
          q.reader = openMainReader(q.fd, maxPacket, { onPacket: (p) => readDirect(q, p), onError: () => handToPump(q) });
          if (!q.reader) handToPump(q);
          else if (packetHandler && Atomics.load(q.ctrl, CTRL_READER) === READER_MAIN) q.reader.start();
        },
      };
    },
    onPacket(handler) {
      const first = packetHandler === undefined;
      packetHandler = handler;
      // Packets may be waiting from before: wake the main-side loops.
      if (first) {
        for (const q of queues) {
          Atomics.add(q.rx.int32, PacketRing.SEQ_INDEX, 1);
          Atomics.notify(q.rx.int32, PacketRing.SEQ_INDEX);
        }
      }
    },
    onDrain(handler) {
      drainHandler = handler;
    },
    onError(handler) {
      errorHandler = handler;
    },
    write,
    stats() {
      let txErrors = directTxErrors;
      let txMerged = 0;
      for (const q of queues) {
        txErrors += Atomics.load(q.ctrl, CTRL_TX_ERRORS);
        txMerged += Atomics.load(q.ctrl, CTRL_TX_MERGED) >>> 0;
      }
      return { ...stats, txErrors, txMerged };
    },
    close,
  };
}
