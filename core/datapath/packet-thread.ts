/**
 * The main thread's handle on a datagram endpoint's packet thread
 * (packet-worker.ts says what the thread does and why).
 *
 * Life: start() spawns the thread; the endpoint goes on reading on the event
 * loop until the thread reports that it reads (so nothing waits on a thread
 * still loading), then hands receiving over, and takes it back for bursts
 * ('udp-busy', mainReads). Sinks (TUN fds, one per session), keys and the
 * TUN's reading (borrowReader) are handed over here; every fd the thread
 * uses is a dup it closes itself, so no fd number it holds is ever reused
 * under it. close() stops the thread and gives everything back; if it ends
 * on its own (a failed start or a syscall error), the same happens and
 * handlers.ended says why.
 */
import { MessageChannel, type MessagePort } from 'node:worker_threads';
import { F_DUPFD_CLOEXEC, libc } from '../tun/libc.ts';
import { createWakeFd, wake } from '../tun/queue-io.ts';
import { startTsWorker } from '../tun/ts-worker.ts';
import { PUMP_HAND_BACK_BELOW, PUMP_HAND_BACK_MS } from '../tun/pump-protocol.ts';
import type { DatagramEndpoint, TunReaderHooks, TunReaderLoan } from '../types.ts';
import type { PacketSink } from '../session.ts';
import { CTRL_OPENED, CTRL_POSTED, CTRL_RECEIVED, CTRL_SLOTS, STAT_SLOTS, type PacketCommand, type PacketEvent, type PacketWorkerData, type ThreadAeadRef } from './packet-protocol.ts';

/**
 * After a burst, main reads the socket until a window of QUIET_MS brings
 * fewer than QUIET_BELOW datagrams, as the TUN pump hands its reading back
 * (PUMP_HAND_BACK_MS, PUMP_HAND_BACK_BELOW).
 */
const QUIET_MS = PUMP_HAND_BACK_MS;
const QUIET_BELOW = PUMP_HAND_BACK_BELOW;

export interface PacketThreadHandlers {
  /** A datagram the thread did not open: handle it as if the endpoint had delivered it. */
  raw(data: Buffer, from: string): void;
  /** A record the thread authenticated and accepted under the keys of `index`; not to be checked again. */
  opened(index: number, plaintext: Buffer, length: number, from: string): void;
  /** A packet the thread read from the TUN of sink `sink` and could not send: handle it as read by the device. */
  tunPacket(sink: number, packet: Buffer): void;
  /** The thread ended without being asked to (`reason`); the endpoint reads on the event loop again. */
  ended(reason: string): void;
}

/** A sink as the thread knows it, with the counters it adds to (STAT_* in packet-protocol.ts). */
export interface ThreadSink {
  readonly id: number;
  readonly stats: Int32Array;
}

export class PacketThread {
  private readonly port: MessagePort;
  private readonly wakeFd: number;
  private readonly ctrl: Int32Array;
  private nextSink = 1;
  private state: 'starting' | 'running' | 'ended' = 'starting';
  private resume: (() => void) | undefined;
  private stopRequested = false;
  /** The TUN reading lent to the thread (borrowReader), given back when it stops. */
  private loan: TunReaderLoan | undefined;
  /** A borrowReader before the thread was ready: the device keeps reading on the main thread until it is. */
  private lendWhenReady: ((hooks: TunReaderHooks) => TunReaderLoan | undefined) | undefined;
  /** While main reads the socket (after 'udp-busy'): datagrams in the current window, and the timer that looks. */
  private mainDatagrams = 0;
  private quietTimer: NodeJS.Timeout | undefined;
  private warmedUp: { rounds: number; ms: number } | undefined;

  private constructor(
    private readonly endpoint: DatagramEndpoint,
    udpFd: number,
    aead: ThreadAeadRef,
    private readonly handlers: PacketThreadHandlers,
  ) {
    const c = libc();
    this.wakeFd = createWakeFd();
    const dup = c.fcntlInt(udpFd, F_DUPFD_CLOEXEC, 0);
    if (dup < 0) {
      c.close(this.wakeFd);
      throw new Error(`dup of the UDP socket failed: ${c.errnoName(c.errno())}`);
    }
    const ctrlSab = new SharedArrayBuffer(CTRL_SLOTS * 4);
    this.ctrl = new Int32Array(ctrlSab);
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    const data: PacketWorkerData & { port: MessagePort } = { udpFd: dup, wakeFd: this.wakeFd, aead, ctrl: ctrlSab, port: port2 };
    const worker = startTsWorker(new URL('./packet-worker.ts', import.meta.url), { workerData: data, transferList: [port2], name: 'udp-packets' });
    worker.on('message', (event: PacketEvent) => this.onEvent(event));
    worker.on('error', (err) => this.onEnd(err.message));
    worker.once('exit', () => {
      this.onEnd('the packet thread exited');
      libc().close(this.wakeFd);
    });
    worker.unref();
  }

  /**
   * A packet thread for `endpoint`, or undefined when the endpoint cannot
   * hand receiving over (see DatagramEndpoint.handOffReceive) or the thread
   * cannot be made here.
   */
  static start(endpoint: DatagramEndpoint, aead: ThreadAeadRef, handlers: PacketThreadHandlers): PacketThread | undefined {
    if (typeof endpoint.handOffReceive !== 'function') return undefined;
    // Asked now only to learn the fd and whether it can be done at all; reading resumes until the thread runs.
    const probe = endpoint.handOffReceive();
    if (probe === undefined) return undefined;
    probe.resume();
    try {
      return new PacketThread(endpoint, probe.fd, aead, handlers);
    } catch {
      return undefined;
    }
  }

  /** Datagrams the thread has read, and records it opened and wrote itself (for tests and logs). */
  get counts(): { received: number; opened: number } {
    return { received: Atomics.load(this.ctrl, CTRL_RECEIVED), opened: Atomics.load(this.ctrl, CTRL_OPENED) };
  }

  /**
   * The lone packets the thread sent through its own path before it took
   * traffic, and the milliseconds that took (undefined until it is ready;
   * 0 rounds where it could not: see warmUp in packet-worker.ts).
   */
  get warmUp(): { rounds: number; ms: number } | undefined {
    return this.warmedUp;
  }

  get running(): boolean {
    return this.state !== 'ended';
  }

  /**
   * Hand the thread a TUN fd (it writes to a dup) for one session's packets,
   * which come from `recvFrom` (null: anywhere) and go to `sendTo`. Throws
   * if the fd cannot be duplicated.
   */
  addSink(sink: PacketSink, source4: number, source6: Uint8Array | null, recvFrom: string | null, sendTo: string): ThreadSink {
    const c = libc();
    const fd = c.fcntlInt(sink.fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) throw new Error(`dup of the TUN fd failed: ${c.errnoName(c.errno())}`);
    const id = this.nextSink++;
    const stats = new SharedArrayBuffer(STAT_SLOTS * 4);
    this.send({ op: 'sink', id, fd, source4, source6, maxPacket: sink.maxPacket, stats, recvFrom, sendTo });
    return { id, stats: new Int32Array(stats) };
  }

  removeSink(id: number): void {
    this.send({ op: 'unsink', id });
  }

  handOver(cmd: Extract<PacketCommand, { op: 'keys' }>): void {
    this.send(cmd);
  }

  /** The session's current sending key, the peer's index for it and the shared counter (BigInt64Array(1)). */
  setSending(sink: number, key: Uint8Array, remoteIndex: number, counter: SharedArrayBuffer): void {
    this.send({ op: 'send', sink, key, remoteIndex, counter });
  }

  /**
   * Let the thread read the TUN's lone packets in the main thread's place,
   * if the device lends that (see TunReaderLoan); once per thread. Asked
   * before the thread is ready, it borrows once it is: the device reads on
   * the main thread until then. The reading is given back when the thread
   * stops.
   */
  borrowReader(lend: (hooks: TunReaderHooks) => TunReaderLoan | undefined): void {
    if (this.loan !== undefined || this.state === 'ended' || this.stopRequested) return;
    if (this.state === 'starting') {
      this.lendWhenReady = lend;
      return;
    }
    let loan: TunReaderLoan | undefined;
    const hooks: TunReaderHooks = {
      wake: () => {
        if (this.state !== 'ended') wake(this.wakeFd);
      },
      revoke: () => {
        if (loan === undefined || this.loan !== loan) return;
        this.loan = undefined;
        this.send({ op: 'unreader' });
      },
    };
    loan = lend(hooks);
    if (loan === undefined) return;
    const c = libc();
    const fd = c.fcntlInt(loan.fd, F_DUPFD_CLOEXEC, 0);
    const pumpWakeFd = fd < 0 ? -1 : c.fcntlInt(loan.pumpWakeFd, F_DUPFD_CLOEXEC, 0);
    if (pumpWakeFd < 0) {
      if (fd >= 0) c.close(fd);
      loan.giveBack();
      return;
    }
    this.loan = loan;
    this.send({ op: 'reader', fd, ctrl: loan.ctrl, pumpWakeFd });
  }

  /** The session's peer moved (server: roaming). */
  setPeer(sink: number, peer: string): void {
    this.send({ op: 'peer', sink, peer });
  }

  drop(index: number): void {
    this.send({ op: 'drop', index });
  }

  /** Stop the thread; the endpoint reads on the event loop again. Idempotent. */
  close(): void {
    if (this.stopRequested) return;
    this.stopRequested = true;
    this.send({ op: 'stop' });
    this.giveBack();
  }

  private send(cmd: PacketCommand): void {
    if (this.state === 'ended') return;
    this.port.postMessage(cmd);
    Atomics.add(this.ctrl, CTRL_POSTED, 1);
    wake(this.wakeFd);
  }

  private onEvent(event: PacketEvent): void {
    // Before 'ready', packets come only from the thread's warm-up (its own sockets): nothing for main.
    if (this.state === 'starting' && event.t !== 'ready' && event.t !== 'ended') return;
    switch (event.t) {
      case 'ready':
        if (this.state !== 'starting') return;
        this.state = 'running';
        this.warmedUp = event.warmUp;
        if (!this.stopRequested) this.resume = this.endpoint.handOffReceive?.()?.resume;
        if (this.lendWhenReady !== undefined) {
          const lend = this.lendWhenReady;
          this.lendWhenReady = undefined;
          this.borrowReader(lend);
        }
        return;
      case 'udp-busy':
        this.mainReads();
        return;
      case 'raw':
        this.handlers.raw(Buffer.from(event.data.buffer, event.data.byteOffset, event.data.length), event.from);
        return;
      case 'open':
        this.handlers.opened(event.index, Buffer.from(event.plaintext.buffer, event.plaintext.byteOffset, event.plaintext.length), event.length, event.from);
        return;
      case 'tun':
        this.handlers.tunPacket(event.sink, Buffer.from(event.packet.buffer, event.packet.byteOffset, event.packet.length));
        return;
      case 'ended':
        this.onEnd(event.error ?? 'the packet thread stopped');
        return;
    }
  }

  private onEnd(reason: string): void {
    if (this.state === 'ended') return;
    this.state = 'ended';
    this.lendWhenReady = undefined;
    this.giveBack();
    this.port.close();
    if (!this.stopRequested) this.handlers.ended(reason);
  }

  /** Datagrams come fast: read them on the event loop (main's batched path) until they come slowly again, then hand back. */
  private mainReads(): void {
    if (this.state !== 'running' || this.stopRequested || this.resume === undefined) return;
    const resume = this.resume;
    this.resume = undefined;
    resume();
    this.mainDatagrams = 0;
    this.quietTimer = setInterval(() => {
      const slow = this.mainDatagrams < QUIET_BELOW;
      this.mainDatagrams = 0;
      if (!slow) return;
      clearInterval(this.quietTimer);
      this.quietTimer = undefined;
      if (this.state !== 'running' || this.stopRequested) return;
      this.resume = this.endpoint.handOffReceive?.()?.resume;
      if (this.resume !== undefined) this.send({ op: 'udp' });
    }, QUIET_MS);
    this.quietTimer.unref();
  }

  /** A datagram reached the main thread (while it reads, see mainReads). */
  noteDatagram(): void {
    this.mainDatagrams++;
  }

  private giveBack(): void {
    clearInterval(this.quietTimer);
    this.quietTimer = undefined;
    const resume = this.resume;
    this.resume = undefined;
    resume?.();
    const loan = this.loan;
    this.loan = undefined;
    loan?.giveBack();
  }
}
