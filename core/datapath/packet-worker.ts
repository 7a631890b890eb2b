/**
 * Worker entry: TUN mode's packet path over udp, off the event loop, for the
 * packets that come one at a time.
 *
 *   UDP fd --recvfrom--> DATA record under keys main handed over --open-->
 *       only PACKET frames, from the expected source --write--> TUN fd
 *   TUN fd, while packets come one at a time --read--> route to a session
 *       --seal--> sendto --> its peer
 *   anything else --postMessage--> main thread (session-datagram.ts)
 *
 * Why: a lone packet's latency is mostly the wake-ups on its way, and what
 * they cost. On the event loop a datagram costs a libuv wake, node:dgram's
 * receive (a 64 KiB buffer, an address object, MakeCallback) and the
 * callback chain down to the session. This thread blocks in poll(2) on the
 * socket and the TUN and does only the work. It does both directions, as
 * one thread: the answer to a packet it writes into the TUN (a ping's
 * reply, a TCP ACK) is often queued before write(2) returns, since the
 * kernel forwards it on the spot, and this thread, still running, reads it
 * without a wake-up, where a second thread would be woken from idle for it.
 *
 * The TUN's lone packets are the thread's only while the device lends it
 * their reading (TunDevice.lendReader): as the main thread's event loop
 * would, it reads while the queue's pump says READER_MAIN and hands
 * reading to the pump when packets come in bursts (TUN_BURST a
 * millisecond), so a stream is read by one thread in order. Main keeps
 * everything that is not a plain packet: handshakes, control records,
 * rekeys, roaming, timers, and the packets the pump reads.
 *
 * Datagrams go the same way: this thread reads the socket while they come
 * one at a time and hands it to main's batched path (node:dgram and
 * recvfrom batches, its core doing the work) when 16 come within a
 * millisecond ('udp-busy'); main hands it back after a slow 20 ms window.
 *
 * Either thread may take any record: the replay window of every set of keys
 * main hands over lives in shared memory under a lock (ReplayWindow.share),
 * so a counter is accepted once whichever thread gets it. A record this
 * thread opened but passes to main is passed already accepted, and main
 * does not check it again. Nonces stay unique: the sending counter is one
 * shared BigInt64 that both threads advance with Atomics.add.
 *
 * Before it says 'ready' (and main hands it the socket and the TUN), the
 * thread seals and opens packets of its own (PacketPath.warmUp), so V8 has
 * optimized that code before the first real packet, and a thread whose
 * AEAD does not open what it seals never takes traffic.
 *
 * workerData: PacketWorkerData. Commands: PacketCommand (packet-protocol.ts).
 */
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { ReplayWindow } from '../replay-window.ts';
import { TunQueueIo, wake } from '../tun/queue-io.ts';
import { POLLIN, libc } from '../tun/libc.ts';
import { BurstMeter, TUN_BURST } from '../tun/burst-meter.ts';
import { CTRL_READER, READER_MAIN, READER_PUMP } from '../tun/pump-protocol.ts';
import { sockaddrIn, udpIoOnFd, type UdpIo } from '../udp-io.ts';
import type { InPlaceAead } from '../aead.ts';
import { EAGAIN, ENOBUFS } from '../errno.ts';
import { FRAME_HEADER, FrameType, isPacketsOnly } from '../mux.ts';
import { MAX_COUNTER } from '../noise.ts';
import { DATA_HEADER, MSG_DATA, RECORD_DATA, TAG_LENGTH } from '../session-datagram.ts';
import {
  CTRL_OPENED,
  CTRL_POSTED,
  CTRL_RECEIVED,
  STAT_BYTES,
  STAT_DATA_RECORDS,
  STAT_RECORDS,
  STAT_SENT_BYTES,
  STAT_SENT_RECORDS,
  STAT_SLOTS,
  type PacketCommand,
  type PacketEvent,
  type PacketWorkerData,
} from './packet-protocol.ts';

const data = workerData as PacketWorkerData & { port: MessagePort };
const port = data.port;
const ctrl = new Int32Array(data.ctrl);
/** Datagrams read per wake before the port gets a look (new keys, stop). */
const BATCH = 64;
/** Where a packet read from the TUN starts in the datagram sealed around it: header, record type, frame header. */
const PACKET_OFFSET = DATA_HEADER + 1 + FRAME_HEADER;

interface SendState {
  key: Buffer;
  remoteIndex: number;
  counter: BigInt64Array;
}

interface Sink {
  id: number;
  io: TunQueueIo;
  source4: number;
  source6: Uint8Array | null;
  maxPacket: number;
  stats: Int32Array;
  recvFrom: string | null;
  sendTo: Buffer | undefined;
  send: SendState | null;
}

interface Keys {
  sink: Sink;
  key: Buffer;
  bornAt: number;
  rejectAfterMs: number;
  window: ReplayWindow;
}

const sinks = new Map<number, Sink>();
/** Server: sinks by their client's address, to route what the TUN gives back. */
const sinksBy4 = new Map<number, Sink>();
const sinksBy6 = new Map<string, Sink>();
const keys = new Map<number, Keys>();
let stopping = false;

/** The TUN queue whose lone packets this thread reads (see the file comment), while lent. */
interface Reader {
  io: TunQueueIo;
  ctrl: Int32Array;
  pumpWakeFd: number;
  reads: BurstMeter;
}
let reader: Reader | null = null;
/** Whether this thread reads the socket (see 'udp-busy' in packet-protocol.ts). */
let udpOwned = true;
const datagramBursts = new BurstMeter(TUN_BURST);

function closeReader(): void {
  if (reader === null) return;
  libc().close(reader.io.fd);
  libc().close(reader.pumpWakeFd);
  reader = null;
}

function post(event: PacketEvent, transfer?: ArrayBuffer[]): void {
  parentPort!.postMessage(event, transfer);
}

function destination(peer: string): Buffer | undefined {
  const colon = peer.lastIndexOf(':');
  return sockaddrIn(peer.slice(0, colon), Number(peer.slice(colon + 1)));
}

function removeSink(sink: Sink): void {
  sinks.delete(sink.id);
  if (sinksBy4.get(sink.source4) === sink) sinksBy4.delete(sink.source4);
  const key6 = sink.source6 === null ? null : Buffer.from(sink.source6).toString('hex');
  if (key6 !== null && sinksBy6.get(key6) === sink) sinksBy6.delete(key6);
  for (const [index, k] of keys) if (k.sink === sink) keys.delete(index);
  libc().close(sink.io.fd);
}

function apply(cmd: PacketCommand): void {
  switch (cmd.op) {
    case 'sink': {
      const sink: Sink = {
        id: cmd.id,
        io: new TunQueueIo(cmd.fd, data.wakeFd),
        source4: cmd.source4,
        source6: cmd.source6,
        maxPacket: cmd.maxPacket,
        stats: new Int32Array(cmd.stats),
        recvFrom: cmd.recvFrom,
        sendTo: destination(cmd.sendTo),
        send: null,
      };
      sinks.set(cmd.id, sink);
      if (sink.source4 !== -1) sinksBy4.set(sink.source4, sink);
      if (sink.source6 !== null) sinksBy6.set(Buffer.from(sink.source6).toString('hex'), sink);
      break;
    }
    case 'send': {
      const sink = sinks.get(cmd.sink);
      if (sink !== undefined) sink.send = { key: Buffer.from(cmd.key), remoteIndex: cmd.remoteIndex, counter: new BigInt64Array(cmd.counter) };
      break;
    }
    case 'peer': {
      const sink = sinks.get(cmd.sink);
      if (sink === undefined) break;
      if (sink.recvFrom !== null) sink.recvFrom = cmd.peer;
      sink.sendTo = destination(cmd.peer);
      break;
    }
    case 'unsink': {
      const sink = sinks.get(cmd.id);
      if (sink !== undefined) removeSink(sink);
      break;
    }
    case 'keys': {
      const sink = sinks.get(cmd.sink);
      if (sink === undefined) break;
      keys.set(cmd.index, { sink, key: Buffer.from(cmd.key), bornAt: cmd.bornAt, rejectAfterMs: cmd.rejectAfterMs, window: ReplayWindow.attach(cmd.window) });
      break;
    }
    case 'drop':
      keys.delete(cmd.index);
      break;
    case 'reader':
      closeReader();
      reader = {
        io: new TunQueueIo(cmd.fd, data.wakeFd),
        ctrl: new Int32Array(cmd.ctrl),
        pumpWakeFd: cmd.pumpWakeFd,
        reads: new BurstMeter(TUN_BURST),
      };
      break;
    case 'unreader':
      closeReader();
      break;
    case 'udp':
      udpOwned = true;
      break;
    case 'stop':
      stopping = true;
      break;
  }
}

let postedSeen = 0;

/** Apply what main has posted. Cheap when nothing was: one shared counter says so. */
function drainPort(): void {
  const posted = Atomics.load(ctrl, CTRL_POSTED);
  if (posted === postedSeen) return;
  postedSeen = posted;
  for (;;) {
    const m = receiveMessageOnPort(port);
    if (m === undefined) return;
    apply(m.message as PacketCommand);
  }
}

function sourceAllowed(p: Buffer, at: number, len: number, sink: Sink): boolean {
  const version = p[at]! >> 4;
  if (version === 4) return len >= 20 && (sink.source4 === -1 || p.readUInt32BE(at + 12) === sink.source4);
  if (version === 6) {
    if (len < 40) return false;
    const want = sink.source6;
    if (want === null) return sink.source4 === -1;
    for (let i = 0; i < 16; i++) if (p[at + 8 + i] !== want[i]) return false;
    return true;
  }
  return false;
}

/** The sink for a packet read from the TUN: a client's only one, or a server's by destination. */
function route(p: Buffer, at: number, len: number): Sink | undefined {
  if (sinksBy4.size === 0 && sinksBy6.size === 0) {
    for (const only of sinks.values()) return sinks.size === 1 ? only : undefined;
    return undefined;
  }
  const version = p[at]! >> 4;
  if (version === 4 && len >= 20) return sinksBy4.get(p.readUInt32BE(at + 16));
  if (version === 6 && len >= 40) return sinksBy6.get(p.toString('hex', at + 24, at + 40));
  return undefined;
}

/** Pass a datagram the thread does not open to main (in memory of its own, moved, not cloned again). */
function postRaw(buf: Buffer, n: number, from: string): void {
  const data = copyOf(buf.subarray(0, n));
  post({ t: 'raw', data, from }, [data.buffer as ArrayBuffer]);
}

function copyOf(bytes: Uint8Array): Uint8Array {
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  return copy;
}

class PacketPath {
  private readonly rx = Buffer.allocUnsafe(65536);
  private readonly tx = Buffer.allocUnsafe(65536);
  /** A packet went into a TUN since the last look: its answer may be queued there already. */
  wroteToTun = false;
  /** When the last datagram and the last TUN packet were read (performance.now()). */
  private lastDatagramAt = -Infinity;
  private lastTunReadAt = -Infinity;

  constructor(
    private readonly aead: InPlaceAead,
    private readonly udp: UdpIo,
  ) {}

  /** Read and handle up to BATCH datagrams; returns how many were read. */
  receive(): number {
    const buf = this.rx;
    let got = 0;
    for (; got < BATCH && udpOwned; got++) {
      const n = this.udp.receive(buf);
      if (n < 0) break;
      Atomics.add(ctrl, CTRL_RECEIVED, 1);
      this.datagram(buf, n, this.udp.from);
      const now = performance.now();
      if (datagramBursts.tick(now)) {
        // Coming fast: main's batched path reads from now on, as before this thread (its core does the work).
        udpOwned = false;
        post({ t: 'udp-busy' });
        return got + 1;
      }
      const before = this.lastDatagramAt;
      this.lastDatagramAt = now;
      if (cameAlone(now, before)) return got + 1;
    }
    return got;
  }

  /**
   * While the TUN's lone packets are ours (READER_MAIN), read and send up to
   * BATCH; on a burst, hand reading to the pump. Returns how many were read.
   */
  readTun(): number {
    const r = reader;
    if (r === null || Atomics.load(r.ctrl, CTRL_READER) !== READER_MAIN) return 0;
    const tx = this.tx;
    let got = 0;
    for (; got < BATCH; got++) {
      let n: number;
      try {
        n = r.io.read(tx.subarray(PACKET_OFFSET));
      } catch {
        closeReader(); // the device is going away; main hears of it from the device
        return got;
      }
      if (n === 0) break;
      this.send(n);
      const now = performance.now();
      if (r.reads.tick(now)) {
        // Coming fast: the pump's core reads from now on (we read no more, so the order is kept).
        Atomics.store(r.ctrl, CTRL_READER, READER_PUMP);
        wake(r.pumpWakeFd);
        return got + 1;
      }
      const before = this.lastTunReadAt;
      this.lastTunReadAt = now;
      if (cameAlone(now, before)) return got + 1;
    }
    return got;
  }

  /** The packet of `n` bytes at PACKET_OFFSET of tx: sealed and sent, or to main when no session of ours takes it. */
  private send(n: number): void {
    const tx = this.tx;
    const to = route(tx, PACKET_OFFSET, n);
    if (to === undefined || to.send === null || to.sendTo === undefined || n > to.maxPacket || !this.seal(to, to.send, n)) {
      const sink = to ?? sinks.values().next().value;
      if (sink !== undefined) {
        const packet = copyOf(tx.subarray(PACKET_OFFSET, PACKET_OFFSET + n));
        post({ t: 'tun', sink: sink.id, packet }, [packet.buffer as ArrayBuffer]);
      }
    }
  }

  private datagram(buf: Buffer, n: number, from: string): void {
    if (n < DATA_HEADER + TAG_LENGTH || buf[0] !== MSG_DATA) {
      postRaw(buf, n, from);
      return;
    }
    const index = buf.readUInt32LE(1);
    let k = keys.get(index);
    if (k === undefined) {
      // Main may have just handed these keys over: look before passing it on.
      drainPort();
      k = keys.get(index);
      if (k === undefined) {
        postRaw(buf, n, from);
        return;
      }
    }
    const verdict = this.open(k, buf, n, from);
    if (verdict === OPENED_FOR_MAIN) {
      // Main decides: control records, another address (roaming), a source the sink refuses.
      const copy = copyOf(buf.subarray(DATA_HEADER, n - TAG_LENGTH));
      post({ t: 'open', index, plaintext: copy, length: n, from }, [copy.buffer as ArrayBuffer]);
      return;
    }
    if (verdict === DROPPED) return;
    Atomics.add(ctrl, CTRL_OPENED, 1);
    if (verdict === OPENED_PACKETS) this.deliver(k.sink, buf, n - TAG_LENGTH);
  }

  /**
   * Check and open the DATA record of `n` bytes in `buf` under `k`, in place,
   * and count it on the sink when it is the thread's to finish.
   */
  private open(k: Keys, buf: Buffer, n: number, from: string): Verdict {
    const counter = buf.readUInt32LE(5) + buf.readUInt32LE(9) * 0x1_0000_0000;
    if (!k.window.check(counter, MAX_COUNTER)) return DROPPED;
    if (Date.now() - k.bornAt >= k.rejectAfterMs) return DROPPED;
    const end = n - TAG_LENGTH;
    const plaintext = buf.subarray(DATA_HEADER, end);
    if (!this.aead.decryptInto(k.key, counter, buf.subarray(0, DATA_HEADER), buf.subarray(DATA_HEADER, n), plaintext)) return DROPPED;
    if (!k.window.accept(counter, MAX_COUNTER)) return DROPPED; // main took it meanwhile
    const sink = k.sink;
    let packets = false;
    const mine =
      (sink.recvFrom === null || from === sink.recvFrom) &&
      (plaintext.length === 0 ||
        (plaintext[0] === RECORD_DATA && (packets = isPacketsOnly(buf, DATA_HEADER + 1, end, sink.maxPacket, (at, len) => sourceAllowed(buf, at, len, sink)))));
    if (!mine) return OPENED_FOR_MAIN;
    const stats = sink.stats;
    Atomics.add(stats, STAT_RECORDS, 1);
    Atomics.add(stats, STAT_BYTES, n);
    if (!packets) return OPENED_KEEPALIVE; // counted, nothing else to do
    Atomics.add(stats, STAT_DATA_RECORDS, 1);
    return OPENED_PACKETS;
  }

  /** Write the PACKET frames of the opened record that ends at `end` of `buf` into the sink's TUN. */
  private deliver(sink: Sink, buf: Buffer, end: number): void {
    for (let at = DATA_HEADER + 1; at < end; ) {
      const len = buf.readUInt16BE(at + 5);
      const body = at + FRAME_HEADER;
      sink.io.write(buf.subarray(body, body + len)); // a packet the kernel refuses is dropped, as a NIC would
      at = body + len;
    }
    this.wroteToTun = true;
  }

  /** Seal the packet of `n` bytes at PACKET_OFFSET of tx as one record and send it; false if it could not go. */
  private seal(sink: Sink, send: SendState, n: number): boolean {
    const length = this.sealRecord(send, n);
    if (length < 0) return false;
    const errno = this.udp.send(this.tx.subarray(0, length), sink.sendTo!);
    // A full send buffer loses the datagram, as the network may; the counter is spent either way.
    if (errno !== 0 && errno !== EAGAIN && errno !== ENOBUFS) return true;
    Atomics.add(sink.stats, STAT_SENT_RECORDS, 1);
    Atomics.add(sink.stats, STAT_SENT_BYTES, length);
    return true;
  }

  /** Seal the packet of `n` bytes at PACKET_OFFSET of tx in place as one DATA record; its length, or -1 when the keys are worn out. */
  private sealRecord(send: SendState, n: number): number {
    const counter = Number(Atomics.add(send.counter, 0, 1n));
    if (counter >= MAX_COUNTER) return -1;
    const tx = this.tx;
    tx[0] = MSG_DATA;
    tx.writeUInt32LE(send.remoteIndex, 1);
    tx.writeUInt32LE(counter >>> 0, 5);
    tx.writeUInt32LE(Math.floor(counter / 0x1_0000_0000), 9);
    tx[DATA_HEADER] = RECORD_DATA;
    tx[DATA_HEADER + 1] = FrameType.PACKET;
    tx.writeUInt32BE(0, DATA_HEADER + 2);
    tx.writeUInt16BE(n, DATA_HEADER + 6);
    const plainEnd = PACKET_OFFSET + n;
    this.aead.encryptInto(send.key, counter, tx.subarray(0, DATA_HEADER), tx.subarray(DATA_HEADER, plainEnd), tx.subarray(DATA_HEADER, plainEnd + TAG_LENGTH));
    return plainEnd + TAG_LENGTH;
  }

  /**
   * Seal and open lone packets of the thread's own, under a throwaway key,
   * until V8 has had the rounds it needs to optimize that code (or the time
   * is up: about 30 ms here, while main still does the work). A new thread
   * otherwise runs a session's first thousands of packets in V8's lower
   * tiers: after 3,000 pings the same thread answered 0.08 ms a ping and
   * 0.25 ms a request faster than when new; this takes 0.04-0.06 ms a ping
   * and 0.01-0.14 ms a request of that back in a session's first seconds
   * (the rest is the reading and writing, which needs real fds; after a
   * few seconds of bulk traffic the thread is as fast either way). It is
   * also a check that this thread's AEAD opens what it seals: throws if
   * not, and the sessions go on without the thread.
   */
  warmUp(rounds: number, ms: number): void {
    const send: SendState = { key: randomBytes(32), remoteIndex: 0x7eadbeef, counter: new BigInt64Array(new SharedArrayBuffer(8)) };
    const sink: Sink = {
      id: -1,
      io: new TunQueueIo(-1, data.wakeFd),
      source4: WARM_SOURCE,
      source6: null,
      maxPacket: 1500,
      stats: new Int32Array(new SharedArrayBuffer(STAT_SLOTS * 4)),
      recvFrom: null,
      sendTo: undefined,
      send,
    };
    const k: Keys = { sink, key: send.key, bornAt: Date.now(), rejectAfterMs: ms + 60_000, window: ReplayWindow.attach(new ReplayWindow().share()) };
    // An 84-byte IPv4 ICMP echo, a ping's size, from the sink's own address.
    const packet = Buffer.alloc(84);
    packet[0] = 0x45;
    packet.writeUInt16BE(84, 2);
    packet[8] = 64;
    packet[9] = 1;
    packet.writeUInt32BE(WARM_SOURCE, 12);
    packet.writeUInt32BE(WARM_SOURCE + 1, 16);
    const until = performance.now() + ms;
    for (let i = 0; i < rounds && performance.now() < until; i++) {
      this.tx.set(packet, PACKET_OFFSET);
      const length = this.sealRecord(send, packet.length);
      this.rx.set(this.tx.subarray(0, length));
      if (this.open(k, this.rx, length, '') !== OPENED_PACKETS) throw new Error("this thread's AEAD does not open what it seals");
    }
  }
}

/** What open() made of a record. */
type Verdict = typeof DROPPED | typeof OPENED_KEEPALIVE | typeof OPENED_PACKETS | typeof OPENED_FOR_MAIN;
/** Refused (replayed, too old, forged): dropped in silence. */
const DROPPED = 0;
/** An empty record (a keepalive): counted, nothing to write. */
const OPENED_KEEPALIVE = 1;
/** Only PACKET frames, from the expected source: to the sink's TUN. */
const OPENED_PACKETS = 2;
/** Opened and accepted, but main decides what it is (see datagram()). */
const OPENED_FOR_MAIN = 3;

/**
 * Whether a read at `now` came alone: more than a millisecond after the one
 * before. Then poll(2) tells whether another follows, in place of a read
 * that would most likely find nothing: one syscall fewer per lone packet,
 * and the thread blocks sooner, which lets the thread it just woke (the
 * next hop, often on this CPU) run sooner.
 */
function cameAlone(now: number, before: number): boolean {
  return now - before >= 1;
}

/** Rounds and time bound of PacketPath.warmUp at the thread's start. */
const WARM_UP_ROUNDS = 3000;
const WARM_UP_MS = 200;
/** 10.255.255.1: the warm-up packets' source, never sent anywhere. */
const WARM_SOURCE = 0x0aff_ff01;

async function run(): Promise<void> {
  const mod = (await import(data.aead.module)) as Record<string, unknown>;
  const make = mod[data.aead.export];
  const aead = typeof make === 'function' ? (make as () => InPlaceAead | null)() : null;
  if (aead === null) throw new Error(`${data.aead.export} in ${data.aead.module} gave no AEAD in this thread`);
  const udp = udpIoOnFd(data.udpFd);
  if (udp === undefined) throw new Error('direct UDP I/O is not available in this thread');
  const path = new PacketPath(aead, udp);
  path.warmUp(WARM_UP_ROUNDS, WARM_UP_MS);
  const waiter = new Waiter();
  drainPort();
  post({ t: 'ready' });
  // Each fd is read only when poll said it is readable (or a full batch left more): a lone packet costs no read that finds nothing first.
  let udpReady = true;
  let tunReady = true;
  while (!stopping) {
    const packets: number = tunReady ? path.readTun() : 0;
    const datagrams: number = udpReady ? path.receive() : 0;
    drainPort();
    if (stopping) break;
    // The kernel often queues a written packet's answer before write(2) returns: read it without a poll first.
    const answerMayWait = path.wroteToTun;
    path.wroteToTun = false;
    if (datagrams === BATCH || packets === BATCH || answerMayWait) {
      udpReady = datagrams === BATCH;
      tunReady = packets === BATCH || answerMayWait;
      continue;
    }
    const ready = waiter.wait();
    udpReady = (ready & READY_UDP) !== 0;
    tunReady = (ready & READY_TUN) !== 0;
  }
}

const READY_UDP = 1;
const READY_TUN = 2;

/** poll(2) on the socket, the wake eventfd and (while its lone packets are ours) the TUN. */
class Waiter {
  private readonly fds = new Uint8Array(24);
  private readonly view = new DataView(this.fds.buffer);
  private readonly scratch = new Uint8Array(8);

  /** Block until something is readable; returns READY_UDP | READY_TUN for what is. */
  wait(): number {
    const v = this.view;
    const tun = reader !== null && Atomics.load(reader.ctrl, CTRL_READER) === READER_MAIN ? reader.io.fd : -1;
    const watched = [udpOwned ? data.udpFd : -1, data.wakeFd, tun];
    for (let i = 0; i < 3; i++) {
      v.setInt32(i * 8, watched[i]!, true); // a negative fd is ignored by poll
      v.setInt16(i * 8 + 4, POLLIN, true);
      v.setInt16(i * 8 + 6, 0, true);
    }
    const c = libc();
    // On an error (EINTR) both are tried: a read that finds nothing is harmless.
    if (c.poll(this.fds, 3, -1) < 0) return READY_UDP | READY_TUN;
    if ((v.getInt16(14, true) & POLLIN) !== 0) {
      c.read(data.wakeFd, this.scratch, 8);
      // Woken by main (commands, the pump handing reading back): look at everything.
      return READY_UDP | READY_TUN;
    }
    // POLLERR and POLLHUP count as readable: the read reports them.
    return (v.getInt16(6, true) !== 0 ? READY_UDP : 0) | (v.getInt16(22, true) !== 0 ? READY_TUN : 0);
  }
}

let error: string | undefined;
try {
  await run();
} catch (err) {
  error = err instanceof Error ? err.message : String(err);
} finally {
  for (const sink of [...sinks.values()]) removeSink(sink);
  keys.clear();
  closeReader();
  libc().close(data.udpFd);
  post(error === undefined ? { t: 'ended' } : { t: 'ended', error });
}
