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
 * thread checks that its AEAD opens what it seals (if not, it never takes
 * traffic), then sends lone packets of its own through its whole path, on a
 * socketpair and a loopback socket of its own (warmUp), so V8 has optimized
 * that code before the first real packet.
 *
 * workerData: PacketWorkerData. Commands: PacketCommand (packet-protocol.ts).
 */
import { MessageChannel, parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { randomBytes } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { ReplayWindow } from '../replay-window.ts';
import { TunQueueIo, wake } from '../tun/queue-io.ts';
import { VNET_HDR_LEN } from '../tun/tcp-coalesce.ts';
import { AF_INET, AF_UNIX, F_DUPFD_CLOEXEC, POLLIN, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, libc } from '../tun/libc.ts';
import { BurstMeter, TUN_BURST } from '../tun/burst-meter.ts';
import { CTRL_READER, CTRL_SLOTS as PUMP_CTRL_SLOTS, READER_MAIN, READER_PUMP } from '../tun/pump-protocol.ts';
import { sockaddrIn, udpIoOnFd, type UdpIo } from '../udp-io.ts';
import { withAt, type InPlaceAead, type InPlaceAeadBase } from '../aead.ts';
import { EAGAIN, ENOBUFS } from '../errno.ts';
import { FRAME_HEADER, FrameType, isPacketsOnly } from '../mux.ts';
import { u16be, u32be } from '../bytes.ts';
import { MAX_COUNTER } from '../noise.ts';
import { DATA_HEADER, MSG_DATA, RECORD_DATA, TAG_LENGTH } from '../session-datagram.ts';
import {
  CTRL_OPENED,
  CTRL_POSTED,
  CTRL_RECEIVED,
  CTRL_SLOTS,
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

/*
 * The thread's records are classes, not object literals: the warm-up makes
 * them as the commands do, and V8 gives every instance of a class one shape
 * from the first, so code optimized on the warm-up's stays valid for the
 * real ones. (A literal's first object is made differently from the rest:
 * the second one changed the shape the warm-up's code relied on, and V8
 * threw that code away.)
 */

/** Sending under one set of keys: main's send counter is shared (Atomics.add reserves one). */
class SendState {
  constructor(
    readonly key: Buffer,
    readonly remoteIndex: number,
    readonly counter: BigInt64Array,
  ) {}
}

/** One session's packets: the TUN they go into, whom they come from and go to. */
class Sink {
  send: SendState | null = null;
  constructor(
    readonly id: number,
    readonly io: TunQueueIo,
    /** The session's IPv4 address as a number (-1: none, the client), and its IPv6 address. */
    public source4: number,
    public source6: Uint8Array | null,
    readonly maxPacket: number,
    readonly stats: Int32Array,
    /** Null: records are taken from any address (the client); else only from this one. */
    public recvFrom: string | null,
    public sendTo: Buffer | undefined,
  ) {}
}

/** A set of keys main handed over, and the window of counters accepted under them (shared with main). */
class Keys {
  constructor(
    readonly sink: Sink,
    readonly key: Buffer,
    /** performance.now() from which records under these keys are refused: main's bornAt + rejectAfterMs, on this thread's clock. */
    readonly rejectAt: number,
    readonly window: ReplayWindow,
  ) {}
}

/**
 * This thread's performance.now() at the wall-clock time `epochMs`. A
 * record's age is checked on this clock: performance.now() is a fast call
 * where Date.now() enters V8's runtime, and it is read per datagram anyway.
 */
function threadTime(epochMs: number): number {
  return performance.now() + (epochMs - Date.now());
}

const sinks = new Map<number, Sink>();
/** Server: sinks by their client's address (IPv4 as a signed 32-bit number, as keys below), to route what the TUN gives back. */
const sinksBy4 = new Map<number, Sink>();
const sinksBy6 = new Map<string, Sink>();
/**
 * Keys by their index as a signed 32-bit number (index | 0): V8 keeps that
 * a small integer, where an index above 2^31 would be a double, boxed for
 * every lookup.
 */
const keys = new Map<number, Keys>();
let stopping = false;

/** The TUN queue whose lone packets this thread reads (see the file comment), while lent. */
class Reader {
  constructor(
    readonly io: TunQueueIo,
    /** The pump's control slots, and its eventfd (-1: none). */
    readonly ctrl: Int32Array,
    readonly pumpWakeFd: number,
    /** Packets a millisecond, to hand reading to the pump on a burst (the warm-up swaps it to make one). */
    public reads: BurstMeter,
  ) {}
}
let reader: Reader | null = null;
/** Whether this thread reads the socket (see 'udp-busy' in packet-protocol.ts). */
let udpOwned = true;

/** The sink when there is exactly one (a client's), kept so routing a packet makes no iterator. */
let onlySink: Sink | undefined;

function addSink(sink: Sink): void {
  sinks.set(sink.id, sink);
  onlySink = sinks.size === 1 ? sink : undefined;
  if (sink.source4 !== -1) sinksBy4.set(sink.source4 | 0, sink);
  if (sink.source6 !== null) sinksBy6.set(Buffer.from(sink.source6).toString('hex'), sink);
}

function closeReader(): void {
  if (reader === null) return;
  libc().close(reader.io.fd);
  if (reader.pumpWakeFd >= 0) libc().close(reader.pumpWakeFd);
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
  if (sinksBy4.get(sink.source4 | 0) === sink) sinksBy4.delete(sink.source4 | 0);
  const key6 = sink.source6 === null ? null : Buffer.from(sink.source6).toString('hex');
  if (key6 !== null && sinksBy6.get(key6) === sink) sinksBy6.delete(key6);
  for (const [index, k] of keys) if (k.sink === sink) keys.delete(index);
  onlySink = sinks.size === 1 ? sinks.values().next().value : undefined;
  libc().close(sink.io.fd);
}

function apply(cmd: PacketCommand): void {
  switch (cmd.op) {
    case 'sink':
      addSink(new Sink(cmd.id, new TunQueueIo(cmd.fd, data.wakeFd), cmd.source4, cmd.source6, cmd.maxPacket, new Int32Array(cmd.stats), cmd.recvFrom, destination(cmd.sendTo)));
      break;
    case 'send': {
      const sink = sinks.get(cmd.sink);
      if (sink !== undefined) sink.send = new SendState(Buffer.from(cmd.key), cmd.remoteIndex, new BigInt64Array(cmd.counter));
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
      keys.set(cmd.index | 0, new Keys(sink, Buffer.from(cmd.key), threadTime(cmd.bornAt + cmd.rejectAfterMs), ReplayWindow.attach(cmd.window)));
      break;
    }
    case 'drop':
      keys.delete(cmd.index | 0);
      break;
    case 'reader':
      closeReader();
      reader = new Reader(new TunQueueIo(cmd.fd, data.wakeFd), new Int32Array(cmd.ctrl), cmd.pumpWakeFd, new BurstMeter(TUN_BURST));
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

/**
 * Commands posted to this thread on a port, counted in CTRL_POSTED of a
 * shared Int32Array: main's, or the warm-up's own (so the warm-up runs this
 * code without ever applying one of main's).
 */
class Commands {
  private seen = 0;

  constructor(
    private readonly port: MessagePort,
    private readonly posted: Int32Array,
  ) {}

  /** Apply what was posted since the last look. Cheap when nothing was: one shared counter says so. */
  drain(): void {
    const count = Atomics.load(this.posted, CTRL_POSTED);
    if (count === this.seen) return;
    this.seen = count;
    for (;;) {
      const m = receiveMessageOnPort(this.port);
      if (m === undefined) return;
      apply(m.message as PacketCommand);
    }
  }
}

function sourceAllowed(p: Buffer, at: number, len: number, sink: Sink): boolean {
  const version = p[at]! >> 4;
  if (version === 4) return len >= 20 && (sink.source4 === -1 || u32be(p, at + 12) === sink.source4);
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
  if (sinksBy4.size === 0 && sinksBy6.size === 0) return onlySink;
  const version = p[at]! >> 4;
  if (version === 4 && len >= 20) return sinksBy4.get(u32be(p, at + 16) | 0);
  if (version === 6 && len >= 40) return sinksBy6.get(p.toString('hex', at + 24, at + 40));
  return undefined;
}

/**
 * Add `n` to a counter that only this thread writes (CTRL_RECEIVED,
 * CTRL_OPENED and the STAT_* slots; main reads them with Atomics.load): a
 * plain store, which optimized code makes in place, where Atomics.add is a
 * call into one of V8's builtins for every packet. An Int32Array element is
 * never torn, and it wraps as Atomics.add would.
 */
function count(counters: Int32Array, slot: number, n: number): void {
  counters[slot] = (counters[slot]! + n) | 0;
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
  /** Views made once, not per packet: a record's header (its AD) in rx and tx, and rx and tx for numbers (not Buffer's methods: bytes.ts). */
  private readonly rxHeader = this.rx.subarray(0, DATA_HEADER);
  private readonly txHeader = this.tx.subarray(0, DATA_HEADER);
  private readonly rxView = new DataView(this.rx.buffer, this.rx.byteOffset, this.rx.length);
  private readonly txView = new DataView(this.tx.buffer, this.tx.byteOffset, this.tx.length);
  /** A packet went into a TUN since the last look: its answer may be queued there already. */
  wroteToTun = false;
  /** When the last datagram and the last TUN packet were read (performance.now()). */
  private lastDatagramAt = -Infinity;
  private lastTunReadAt = -Infinity;

  constructor(
    private readonly aead: InPlaceAead,
    private readonly udp: UdpIo,
    /** Main's commands, or the warm-up's. */
    readonly commands: Commands,
    /** Where CTRL_RECEIVED and CTRL_OPENED are counted: main's ctrl, or the warm-up's own. */
    private readonly counts: Int32Array,
    /** Datagrams a millisecond, to hand the socket to main on a burst. */
    private readonly datagramBursts: BurstMeter,
  ) {}

  /** Forget when the last packets came: the next datagram and the next TUN packet come alone. */
  quiet(): void {
    this.lastDatagramAt = -Infinity;
    this.lastTunReadAt = -Infinity;
  }

  /** Read and handle up to BATCH datagrams; returns how many were read. */
  receive(): number {
    const buf = this.rx;
    let got = 0;
    for (; got < BATCH && udpOwned; got++) {
      const n = this.udp.receive(buf);
      if (n < 0) break;
      const now = performance.now();
      const opened = this.datagram(n, this.udp.from, now);
      // Counted after the packet went into the TUN: none of this is on its way.
      count(this.counts, CTRL_RECEIVED, 1);
      if (opened) count(this.counts, CTRL_OPENED, 1);
      if (this.datagramBursts.tick(now)) {
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
    let got = 0;
    for (; got < BATCH; got++) {
      let n: number;
      try {
        n = r.io.read(this.tx, PACKET_OFFSET); // the device's vnet header, if it has one, lands in the record's header, written after
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

  /**
   * The datagram of `n` bytes in rx, from `from`, read at `now`
   * (performance.now()); true when this thread opened it and is done with
   * it (false: dropped, or passed to main).
   */
  private datagram(n: number, from: string, now: number): boolean {
    const buf = this.rx;
    if (n < DATA_HEADER + TAG_LENGTH || buf[0] !== MSG_DATA) {
      postRaw(buf, n, from);
      return false;
    }
    const index = this.rxView.getInt32(1, true);
    let k = keys.get(index);
    if (k === undefined) {
      // Main may have just handed these keys over: look before passing it on.
      this.commands.drain();
      k = keys.get(index);
      if (k === undefined) {
        postRaw(buf, n, from);
        return false;
      }
    }
    const verdict = this.open(k, n, from, now);
    if (verdict === OPENED_FOR_MAIN) {
      // Main decides: control records, another address (roaming), a source the sink refuses.
      const copy = copyOf(buf.subarray(DATA_HEADER, n - TAG_LENGTH));
      post({ t: 'open', index: index >>> 0, plaintext: copy, length: n, from }, [copy.buffer as ArrayBuffer]);
      return false;
    }
    if (verdict === DROPPED) return false;
    const sink = k.sink;
    if (verdict === OPENED_PACKETS) this.deliver(sink, buf, n - TAG_LENGTH);
    // Counted after the write, as the packet's way does not need it.
    const stats = sink.stats;
    count(stats, STAT_RECORDS, 1);
    count(stats, STAT_BYTES, n);
    if (verdict === OPENED_PACKETS) count(stats, STAT_DATA_RECORDS, 1);
    return true;
  }

  /**
   * Check and open the DATA record of `n` bytes in rx under `k`, in place,
   * and say whose it is to finish. `now`: performance.now() when it was read.
   */
  private open(k: Keys, n: number, from: string, now: number): Verdict {
    const buf = this.rx;
    const counter = this.rxView.getUint32(5, true) + this.rxView.getUint32(9, true) * 0x1_0000_0000;
    if (!k.window.check(counter, MAX_COUNTER)) return DROPPED;
    if (now >= k.rejectAt) return DROPPED;
    if (!this.aead.openAt(k.key, counter, this.rxHeader, buf, DATA_HEADER, n - DATA_HEADER)) return DROPPED;
    if (!k.window.accept(counter, MAX_COUNTER)) return DROPPED; // main took it meanwhile
    const sink = k.sink;
    if (sink.recvFrom !== null && from !== sink.recvFrom) return OPENED_FOR_MAIN;
    // The plaintext is rx[DATA_HEADER, end).
    const end = n - TAG_LENGTH;
    if (end === DATA_HEADER) return OPENED_KEEPALIVE;
    if (buf[DATA_HEADER] !== RECORD_DATA) return OPENED_FOR_MAIN;
    return isPacketsOnly(buf, DATA_HEADER + 1, end, sink.maxPacket, sourceAllowed, sink) ? OPENED_PACKETS : OPENED_FOR_MAIN;
  }

  /** Write the PACKET frames of the opened record that ends at `end` of `buf` into the sink's TUN. */
  private deliver(sink: Sink, buf: Buffer, end: number): void {
    for (let at = DATA_HEADER + 1; at < end; ) {
      const len = u16be(buf, at + 5);
      const body = at + FRAME_HEADER;
      // In place: the device's vnet header, if it has one, goes over the frame header before the packet. A packet the kernel refuses is dropped, as a NIC would.
      sink.io.writeAt(buf, body, len);
      at = body + len;
    }
    this.wroteToTun = true;
  }

  /** Seal the packet of `n` bytes at PACKET_OFFSET of tx as one record and send it; false if it could not go. */
  private seal(sink: Sink, send: SendState, n: number): boolean {
    const length = this.sealRecord(send, n);
    if (length < 0) return false;
    const errno = this.udp.send(this.tx, sink.sendTo!, length);
    // A full send buffer loses the datagram, as the network may; the counter is spent either way.
    if (errno !== 0 && errno !== EAGAIN && errno !== ENOBUFS) return true;
    count(sink.stats, STAT_SENT_RECORDS, 1);
    count(sink.stats, STAT_SENT_BYTES, length);
    return true;
  }

  /** Seal the packet of `n` bytes at PACKET_OFFSET of tx in place as one DATA record; its length, or -1 when the keys are worn out. */
  private sealRecord(send: SendState, n: number): number {
    const counter = Number(Atomics.add(send.counter, 0, 1n));
    if (counter >= MAX_COUNTER) return -1;
    const tx = this.tx;
    tx[0] = MSG_DATA;
    const view = this.txView;
    view.setUint32(1, send.remoteIndex, true);
    view.setUint32(5, counter >>> 0, true);
    view.setUint32(9, Math.floor(counter / 0x1_0000_0000), true);
    tx[DATA_HEADER] = RECORD_DATA;
    tx[DATA_HEADER + 1] = FrameType.PACKET;
    view.setUint32(DATA_HEADER + 2, 0);
    view.setUint16(DATA_HEADER + 6, n);
    const plainEnd = PACKET_OFFSET + n;
    this.aead.sealAt(send.key, counter, this.txHeader, tx, DATA_HEADER, plainEnd - DATA_HEADER);
    return plainEnd + TAG_LENGTH;
  }

  /**
   * Whether this thread's AEAD opens what it seals: a few lone packets
   * sealed and opened in memory, under a throwaway key. A thread whose AEAD
   * does not must never take traffic.
   */
  opensWhatItSeals(rounds: number): boolean {
    const send = new SendState(randomBytes(32), WARM_INDEXES[0], new BigInt64Array(new SharedArrayBuffer(8)));
    const sink = new Sink(-1, new TunQueueIo(-1, data.wakeFd, VNET_HDR_LEN), WARM_SOURCE, null, WARM_PACKET.length, new Int32Array(new SharedArrayBuffer(STAT_SLOTS * 4)), null, undefined);
    const k = new Keys(sink, send.key, performance.now() + 60_000, ReplayWindow.attach(new ReplayWindow().share()));
    for (let i = 0; i < rounds; i++) {
      this.tx.set(WARM_PACKET, PACKET_OFFSET);
      const length = this.sealRecord(send, WARM_PACKET.length);
      this.rx.set(this.tx.subarray(0, length));
      if (this.open(k, length, '', performance.now()) !== OPENED_PACKETS) return false;
    }
    return true;
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

/**
 * Lone packets and time bound of warmUp at the thread's start. V8 optimizes
 * a function once it has run some thousands of times, and a round calls
 * some of the path's steps only every other time (a server's sinks or a
 * client's): 3,000 rounds within 300 ms, which came to about 1,900 on a
 * slow VM, left the opening, the delivery into the TUN, the sealing, the
 * TUN read or the burst meter (which of them varied from start to start)
 * to be optimized during the first 1,000 pings after 2 s of iperf3, each
 * compile taking a core for 1-8 ms meanwhile; 6,000 rounds, 0.5-0.9 s
 * there, left none of them.
 */
const WARM_UP_ROUNDS = 6000;
const WARM_UP_MS = 1000;
/** Packets sealed and opened in memory before it (PacketPath.opensWhatItSeals). */
const AEAD_CHECK_ROUNDS = 8;
/** How long a warm-up round waits for its packet at each step before it gives up. */
const WARM_UP_WAIT_MS = 50;
/** Turns of the loop a warm-up packet may take to come back (it takes three or four). */
const LOOP_TURNS = 8;
/** A reads meter that never sees a burst: warm-up packets come back to back, and must take the lone packets' way. */
const NEVER_A_BURST = 0x3fff_ffff;
/**
 * The warm-up packets' addresses, never routed anywhere (the benchmarking
 * ranges of RFC 2544 and RFC 5180: 198.18.0.1 and 2001:2::1): each packet
 * goes from one to itself, and never leaves the thread.
 */
const WARM_SOURCE = 0xc612_0001;
const WARM_SOURCE6 = new Uint8Array([0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
const WARM_SOURCE6_KEY = Buffer.from(WARM_SOURCE6).toString('hex');
/**
 * The warm-up keys' indexes (main's are random 32-bit numbers), in a map
 * that holds no other keys while they are in it: one above 2^31 and one
 * below, so the warm-up has seen both signs of the map's int32 key, and
 * both kinds of number the index is handed back to main as (above 2^31 V8
 * holds a double, below it a small integer; optimized code that has seen
 * only one kind is thrown away when the other comes). WARM_SOURCE is above
 * 2^31 for the same reason.
 */
const WARM_INDEXES = [0xfead_beef, 0x1ead_beef] as const;
/** An 84-byte ICMP echo, a ping's size, from WARM_SOURCE to itself, and an ICMPv6 echo from WARM_SOURCE6 to itself. */
const WARM_PACKET = warmPacket(4);
const WARM_PACKET6 = warmPacket(6);
/** The echo to 198.18.0.2, where no sink is. */
const WARM_PACKET_UNROUTED = (() => {
  const p = Buffer.from(WARM_PACKET);
  p.writeUInt32BE(WARM_SOURCE + 1, 16);
  return p;
})();
/** The packets as the warm-up's stand-in for the TUN carries them: behind a vnet header. */
const WARM_FRAME = framed(WARM_PACKET);
const WARM_FRAME6 = framed(WARM_PACKET6);
const WARM_FRAME_UNROUTED = framed(WARM_PACKET_UNROUTED);

function framed(packet: Buffer): Buffer {
  return Buffer.concat([Buffer.alloc(VNET_HDR_LEN), packet]);
}

function warmPacket(version: 4 | 6): Buffer {
  if (version === 4) {
    const p = Buffer.alloc(84);
    p[0] = 0x45;
    p.writeUInt16BE(p.length, 2);
    p[8] = 64;
    p[9] = 1; // ICMP
    p.writeUInt32BE(WARM_SOURCE, 12);
    p.writeUInt32BE(WARM_SOURCE, 16);
    p[20] = 8; // echo request
    return p;
  }
  const p = Buffer.alloc(104);
  p[0] = 0x60;
  p.writeUInt16BE(p.length - 40, 4);
  p[6] = 58; // ICMPv6
  p[7] = 64;
  p.set(WARM_SOURCE6, 8);
  p.set(WARM_SOURCE6, 24);
  p[40] = 128; // echo request
  return p;
}

/**
 * Send lone packets through the thread's whole path, on fds of its own,
 * until V8 has optimized it (`rounds`, or `ms`): a socketpair stands in for
 * the TUN, and a UDP socket on 127.0.0.1 sends each sealed packet to
 * itself. A round is a ping's way through a server's thread: read from the
 * TUN, sealed, sent; received, opened, written back into the TUN. Most
 * rounds take that way through the thread's own loop (serve and
 * Loop.turn, on the warm-up's fds and a port of its own), as real packets
 * do; the rounds that go to main or burst call the path's steps directly.
 *
 * Rounds vary the way a real packet's do, so that V8 has seen every branch
 * one takes when it compiles, and throws none of it away later: a server's
 * sinks (routed by address, the peer checked) or a client's one sink; IPv4
 * or IPv6; alone or close behind another; keys under either kind of index;
 * and now and then a wake from main, or a packet that goes to main: one
 * with no session ('tun'), a record from another address ('open'), a
 * datagram that is not a DATA record, from another socket ('raw'). Main
 * drops what the thread posts before 'ready'. Those posts also move the
 * thread's first ArrayBuffers to main: V8 then throws away every optimized
 * function that touches a typed array (it had assumed none is ever
 * detached), so that must happen here and not at the first real one.
 *
 * Why: V8 optimizes a function after it has run enough, and one lone packet
 * every few milliseconds runs this path rarely: after 1,000 pings and 200
 * requests, a new thread's path was still in V8's baseline tier (all but
 * the sealing and opening, which the earlier, in-memory warm-up ran). With
 * this one, in four alternating rounds each, a request took 0.13-0.15 ms
 * less and a ping 0.03 ms less, on a new session and after bulk traffic
 * alike (the request figure may be kind: bench/FINDINGS.md, "Plain
 * typed-array views", found such A/Bs favour whichever runs first).
 *
 * Returns the rounds done. It stops early, quietly, where the circuit
 * cannot be made or a packet does not come back (no loopback, a firewall):
 * the thread then starts colder, nothing else. Runs before the thread takes
 * any traffic and never looks at main's port (its loop drains a port of its
 * own), so no real sink, key or reader is in the maps meanwhile.
 */
function warmUp(aead: InPlaceAead, waiter: Waiter, rounds: number, ms: number): number {
  const c = libc();
  const owned = new Set<number>();
  const own = (fd: number): number => (fd >= 0 && owned.add(fd), fd);
  const close = (fd: number): void => void (owned.delete(fd) && c.close(fd));
  let done = 0;
  let channel: MessageChannel | undefined;
  try {
    const pair = new Int32Array([-1, -1]);
    if (c.socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, pair) < 0) return 0;
    const [tunFd, hostFd] = [own(pair[0]!), own(pair[1]!)];
    const readerFd = own(c.fcntlInt(tunFd, F_DUPFD_CLOEXEC, 0));
    const mine = loopbackSocket(own);
    if (readerFd < 0 || mine === undefined) return 0;
    const self = `127.0.0.1:${mine.address.readUInt16BE(2)}`;

    const counts = new Int32Array(new SharedArrayBuffer(CTRL_SLOTS * 4));
    channel = new MessageChannel();
    const commands = new Commands(channel.port2, counts);
    const calm = new PacketPath(aead, mine.io, commands, counts, new BurstMeter(NEVER_A_BURST));
    const bursting = new PacketPath(aead, mine.io, commands, counts, new BurstMeter(1));
    const loop = new Loop(calm, waiter, mine.fd, WARM_UP_WAIT_MS);
    // The sink and the reader close their fds when removed.
    owned.delete(tunFd);
    owned.delete(readerFd);
    const sink = new Sink(-1, new TunQueueIo(tunFd, data.wakeFd, VNET_HDR_LEN), WARM_SOURCE, WARM_SOURCE6, WARM_PACKET6.length, new Int32Array(new SharedArrayBuffer(STAT_SLOTS * 4)), self, mine.address);
    addSink(sink);
    const calmReads = new BurstMeter(NEVER_A_BURST);
    const burstReads = new BurstMeter(1);
    const warmReader = new Reader(new TunQueueIo(readerFd, data.wakeFd, VNET_HDR_LEN), new Int32Array(new SharedArrayBuffer(PUMP_CTRL_SLOTS * 4)), -1, calmReads);
    reader = warmReader;
    const sending = WARM_INDEXES.map((index) => new SendState(randomBytes(32), index, new BigInt64Array(new SharedArrayBuffer(8))));
    for (const send of sending) keys.set(send.remoteIndex | 0, new Keys(sink, send.key, performance.now() + ms + 60_000, ReplayWindow.attach(new ReplayWindow().share())));

    const back = Buffer.allocUnsafe(2048);
    const until = performance.now() + ms;
    for (; done < rounds && performance.now() < until; done++) {
      const variant = done & 15;
      const asServer = (done & 1) === 0 || variant === TO_MAIN_TUN || variant === TO_MAIN_OPEN;
      sink.source4 = asServer ? WARM_SOURCE : -1;
      sink.source6 = asServer ? WARM_SOURCE6 : null;
      sink.recvFrom = !asServer ? null : variant === TO_MAIN_OPEN ? ANOTHER_PEER : self;
      if (asServer) {
        sinksBy4.set(WARM_SOURCE | 0, sink);
        sinksBy6.set(WARM_SOURCE6_KEY, sink);
      } else {
        sinksBy4.delete(WARM_SOURCE | 0);
        sinksBy6.delete(WARM_SOURCE6_KEY);
      }
      sink.send = sending[(done >> 4) & 1]!;
      // A burst: the thread hands reading the TUN to the pump, and the socket to main (which drops the word before 'ready').
      const burst = variant === BURST;
      const path = burst ? bursting : calm;
      warmReader.reads = burst ? burstReads : calmReads;
      Atomics.store(warmReader.ctrl, CTRL_READER, READER_MAIN);
      udpOwned = true;
      if ((done & 2) === 0) path.quiet();
      if (variant === WAKE) {
        // As main wakes it with a command, on the warm-up's own port: one that changes nothing here.
        channel.port1.postMessage({ op: 'udp' } satisfies PacketCommand);
        Atomics.add(counts, CTRL_POSTED, 1);
        wake(data.wakeFd);
      }
      if (variant === TO_MAIN_RAW) {
        // From a new socket each time: a sender the path has not heard from before, as a new peer's first datagram is.
        const from = loopbackSocket(own);
        if (from === undefined || from.io.send(NOT_A_RECORD, mine.address) !== 0) break;
        close(from.fd);
        if ((waiter.wait(mine.fd, -1, WARM_UP_WAIT_MS) & READY_UDP) === 0 || path.receive() !== 1) break;
        continue;
      }
      // As the kernel would on a TUN: each packet behind a vnet header (device.ts).
      const packet = variant === TO_MAIN_TUN ? WARM_FRAME_UNROUTED : (done & 4) === 0 ? WARM_FRAME : WARM_FRAME6;
      if (c.write(hostFd, packet, packet.length) !== packet.length) break;
      if (!burst && variant !== TO_MAIN_TUN && variant !== TO_MAIN_OPEN) {
        // Through the loop, as real packets go: half the rounds find the thread asleep in poll (a client's way), half still reading after a write (a server's answer).
        if ((done & 8) === 0) loop.idle();
        let n = c.read(hostFd, back, back.length);
        for (let turns = 0; n < 0 && turns < LOOP_TURNS && serve(loop, 1); turns++) n = c.read(hostFd, back, back.length);
        if (n !== packet.length || packet.compare(back, 0, packet.length) !== 0) break;
        continue;
      }
      if ((waiter.wait(-1, readerFd, WARM_UP_WAIT_MS) & READY_TUN) === 0 || path.readTun() !== 1) break;
      if (variant === TO_MAIN_TUN) continue;
      if ((waiter.wait(mine.fd, -1, WARM_UP_WAIT_MS) & READY_UDP) === 0 || path.receive() !== 1) break;
      path.wroteToTun = false;
      if (variant === TO_MAIN_OPEN) continue;
      if (c.read(hostFd, back, back.length) !== packet.length || packet.compare(back, 0, packet.length) !== 0) break;
    }
    return done;
  } finally {
    channel?.port1.close();
    channel?.port2.close();
    udpOwned = true;
    sinksBy4.delete(WARM_SOURCE | 0);
    sinksBy6.delete(WARM_SOURCE6_KEY);
    const sink = sinks.get(-1);
    if (sink !== undefined) removeSink(sink);
    closeReader();
    for (const fd of owned) c.close(fd);
  }
}

/** The warm-up rounds (of every 16) that wake the thread as main would, that come in a burst, and that go to main each way. */
const WAKE = 15;
const BURST = 11;
const TO_MAIN_TUN = 5;
const TO_MAIN_OPEN = 9;
const TO_MAIN_RAW = 13;
/** A one-byte datagram: not a DATA record, so the thread passes it to main. */
const NOT_A_RECORD = Buffer.from([0]);
/** A peer the warm-up's records never come from. */
const ANOTHER_PEER = '127.0.0.2:1';

/** A UDP socket of the thread's own on 127.0.0.1 (its fd handed to `own`), or undefined where there is none. */
function loopbackSocket(own: (fd: number) => number): { fd: number; address: Buffer; io: UdpIo } | undefined {
  const c = libc();
  const fd = own(c.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (fd < 0) return undefined;
  const address = sockaddrIn('127.0.0.1', 0)!;
  if (c.bind(fd, address, address.length) < 0 || c.getsockname(fd, address, new Uint32Array([address.length])) < 0) return undefined;
  const io = udpIoOnFd(fd);
  return io === undefined ? undefined : { fd, address, io };
}

async function run(): Promise<void> {
  const mod = (await import(data.aead.module)) as Record<string, unknown>;
  const make = mod[data.aead.export];
  const made = typeof make === 'function' ? (make as () => InPlaceAeadBase | null)() : null;
  if (made === null) throw new Error(`${data.aead.export} in ${data.aead.module} gave no AEAD in this thread`);
  const aead = withAt(made);
  const udp = udpIoOnFd(data.udpFd);
  if (udp === undefined) throw new Error('direct UDP I/O is not available in this thread');
  const commands = new Commands(port, ctrl);
  const path = new PacketPath(aead, udp, commands, ctrl, new BurstMeter(TUN_BURST));
  if (!path.opensWhatItSeals(AEAD_CHECK_ROUNDS)) throw new Error("this thread's AEAD does not open what it seals");
  const waiter = new Waiter();
  const startedAt = performance.now();
  const rounds = warmUp(aead, waiter, WARM_UP_ROUNDS, WARM_UP_MS);
  commands.drain();
  post({ t: 'ready', warmUp: { rounds, ms: performance.now() - startedAt } });
  const loop = new Loop(path, waiter, data.udpFd, -1);
  while (!stopping) serve(loop, TURNS_PER_SERVE);
}

/**
 * The turns run() asks of one serve() call. A small integer, as the
 * warm-up's 1 is: serve was optimized on the warm-up's calls, and a first
 * call with Infinity (a heap number, "not a Smi" to V8) threw that code
 * away, so the thread's loop ran unoptimized until V8 replaced it on the
 * stack, which packets that come one at a time took many seconds to bring
 * about.
 */
const TURNS_PER_SERVE = 0x3fff_ffff;

/**
 * Turn `loop` until the thread stops, `turns` turns are done, or a turn
 * finds nothing within its wait; false in that last case. The warm-up
 * calls it a turn at a time, so V8 has optimized it, and the loop in it,
 * before run() enters it for good.
 */
function serve(loop: Loop, turns: number): boolean {
  for (let i = 0; i < turns && !stopping; i++) if (!loop.turn()) return false;
  return true;
}

/**
 * The thread's loop, a turn at a time. The warm-up turns one of its own
 * (on its own fds and port), so V8 has optimized the turn, and what it
 * calls, before the first real packet: a function that only the loop ran
 * was still in V8's baseline tier after minutes of pings (perf:
 * bench/FINDINGS.md, "What optimized code still called on a packet's way").
 */
class Loop {
  // Each fd is read only when poll said it is readable (or a full batch left more): a lone packet costs no read that finds nothing first.
  private udpReady = true;
  private tunReady = true;

  constructor(
    private readonly path: PacketPath,
    private readonly waiter: Waiter,
    private readonly udpFd: number,
    /** How long a turn may block in poll(2) (-1: no limit). */
    private readonly waitMs: number,
  ) {}

  /** Poll first on the next turn, as after a turn that found nothing. */
  idle(): void {
    this.udpReady = false;
    this.tunReady = false;
  }

  /**
   * Block in poll(2) if nothing was left ready, then read what is, and
   * apply what was posted. False when poll gave up after waitMs with
   * nothing ready. Poll comes first so that a packet's way from the wake-up
   * to its read stays in this function.
   */
  turn(): boolean {
    if (!this.udpReady && !this.tunReady) {
      const tun = reader !== null && Atomics.load(reader.ctrl, CTRL_READER) === READER_MAIN ? reader.io.fd : -1;
      const ready = this.waiter.wait(udpOwned ? this.udpFd : -1, tun, this.waitMs);
      if (ready === 0) return false;
      this.udpReady = (ready & READY_UDP) !== 0;
      this.tunReady = (ready & READY_TUN) !== 0;
    }
    const path = this.path;
    const packets: number = this.tunReady ? path.readTun() : 0;
    const datagrams: number = this.udpReady ? path.receive() : 0;
    path.commands.drain();
    // The kernel often queues a written packet's answer before write(2) returns: read it without a poll first.
    const answerMayWait = path.wroteToTun;
    path.wroteToTun = false;
    this.udpReady = datagrams === BATCH;
    this.tunReady = packets === BATCH || answerMayWait;
    return true;
  }
}

const READY_UDP = 1;
const READY_TUN = 2;

/** poll(2) on a socket, the wake eventfd and a TUN. */
class Waiter {
  private readonly fds = new Uint8Array(24);
  private readonly view = new DataView(this.fds.buffer);
  private readonly scratch = new Uint8Array(8);
  private readonly c = libc();

  /**
   * Block until `udpFd` or `tunFd` is readable (a negative fd is not
   * watched), main wakes the thread, or `timeoutMs` pass (-1: no limit);
   * returns READY_UDP | READY_TUN for what is readable (both when woken).
   */
  wait(udpFd: number, tunFd: number, timeoutMs: number): number {
    const v = this.view;
    watch(v, 0, udpFd);
    watch(v, 8, data.wakeFd);
    watch(v, 16, tunFd);
    const c = this.c;
    // On an error (EINTR) both are tried: a read that finds nothing is harmless.
    if (c.poll(this.fds, 3, timeoutMs) < 0) return READY_UDP | READY_TUN;
    if ((v.getInt16(14, true) & POLLIN) !== 0) {
      c.read(data.wakeFd, this.scratch, 8);
      // Woken by main (commands, the pump handing reading back): look at everything.
      return READY_UDP | READY_TUN;
    }
    // POLLERR and POLLHUP count as readable: the read reports them.
    return (v.getInt16(6, true) !== 0 ? READY_UDP : 0) | (v.getInt16(22, true) !== 0 ? READY_TUN : 0);
  }
}

/** Fill the struct pollfd at `at` to wait for `fd` to be readable (a negative fd is ignored by poll). */
function watch(v: DataView, at: number, fd: number): void {
  v.setInt32(at, fd, true);
  v.setInt16(at + 4, POLLIN, true);
  v.setInt16(at + 6, 0, true);
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
