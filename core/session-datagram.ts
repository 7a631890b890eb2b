/**
 * Secure sessions over a datagram transport (DESIGN.md §4): the same
 * Session as core/session.ts gives over a stream, for a network that may
 * lose, duplicate and reorder datagrams and whose peers change address.
 * The transport's DatagramEndpoint only moves datagrams; everything else is
 * here, as in wireguard-go's device/ over its conn.Bind.
 *
 * Messages (one per datagram; indices u32 and the counter u64 little-endian)
 *
 *   1 INITIATION  1 || sender index || Noise message 1     (client -> server)
 *   2 RESPONSE    2 || sender index || receiver index || Noise message 2
 *   4 DATA        4 || receiver index || counter || AEAD(key, nonce = counter,
 *                                                     ad = the 13 header bytes,
 *                                                     plaintext = record)
 *
 * The handshake payloads are those of stream sessions (core/handshake.ts).
 * Each side picks a random index for each set of keys and the peer writes
 * it as the receiver index, so a record finds its keys with one Map lookup
 * and no trial decryption. The counter in the clear is the AEAD nonce, so
 * records decrypt in any order; a sliding window (core/replay-window.ts,
 * 4064 wide) refuses duplicates and records that are too old.
 *
 * A record's plaintext is empty (a keepalive) or type (1 byte) || body:
 *   0 DATA            one mux payload
 *   1 REKEY_INIT      sender index || Noise message 1 of a new handshake (client -> server)
 *   2 REKEY_RESPONSE  sender index || receiver index || Noise message 2 (server -> client)
 *   3 CLOSE           the sender is closing on purpose
 *   4 CONFIRM         the client has the keys (answered with a keepalive)
 * Unknown types are ignored.
 *
 * Establishing (1.5 round trips): the client sends an initiation, and a new
 * one (fresh ephemeral key, timestamp and index) after 1 s, 2 s, 4 s ...
 * until an answer or handshakeTimeoutMs; any of them may be answered. Then it
 * sends CONFIRM, again with backoff, until the server's keepalive answers;
 * connect resolves then. The server answers each authentic initiation and
 * keeps the keys half-open until a record under them authenticates; only
 * then it announces the session (onSession). Half-open keys that are not
 * confirmed within handshakeTimeoutMs are forgotten without a word.
 *
 * Silence: nothing that fails to authenticate gets an answer or costs
 * memory. Garbage is dropped before any crypto unless it is shaped like an
 * initiation; initiations are rate-limited per source IP and overall, and
 * half-open handshakes are capped (per client key and in total).
 *
 * Roaming: when an authenticated, new (window-accepted) record reaches the
 * server from another address, the session's peer address becomes that
 * address, as WireGuard does; replays cannot move it (the window refuses
 * them) and nobody without the keys can make one.
 *
 * Rekey: as on streams, the client starts a new handshake inside the
 * session (REKEY_INIT under the current keys) every rekeyAfterMs, resending
 * a fresh one every second or so until answered. The server answers each
 * under its current keys and keeps every answered one pending; the client
 * switches to the first answer it reads and confirms with a keepalive under
 * the new keys. The server goes on sending under the old keys until a record
 * under new ones authenticates, so no direction has a gap. Old receiving
 * keys stay valid (for records still in flight) until rejectAfterMs.
 *
 * Keepalive and expiry: after receiving data, a side that has sent nothing
 * for 10 s sends an empty keepalive (WireGuard's passive keepalive), so the
 * peer knows the path works. The client's mux ping (client.keepalive) keeps
 * NAT mappings open while idle. A session with no authenticated record for
 * idleTimeoutMs (default 180 s) closes with TUNNEL_DOWN; keys older than
 * rejectAfterMs are refused (a client that cannot rekey in time closes).
 */
import { randomInt } from 'node:crypto';
import { DshieldError, ErrorCodes } from './errors.ts';
import {
  checkInitiation,
  initiatorFactory,
  jsonBytes,
  protocolError,
  readResponse,
  TIMEOUT_ADVICE,
  writeInitiation,
  type ResponderContext,
} from './handshake.ts';
import { MAX_COUNTER, type CipherState, type HandshakeState, type TransportKeys } from './noise.ts';
import { ReplayWindow } from './replay-window.ts';
import { parseIp, ipToBytes } from './cidr.ts';
import { PacketThread, type ThreadSink } from './datapath/packet-thread.ts';
import { STAT_BYTES, STAT_DATA_RECORDS, STAT_RECORDS, STAT_SENT_BYTES, STAT_SENT_RECORDS, type ThreadAeadRef } from './datapath/packet-protocol.ts';
import { Roster, type RosterTicket } from './roster.ts';
import type { ClientHandshakeOptions, PacketSink, ServerAcceptOptions, Session, SessionHandlers } from './session.ts';
import type { ClientIdentity, DatagramEndpoint, Logger, TransportListener } from './types.ts';

// ---------------------------------------------------------------------------
// Wire constants

const MSG_INITIATION = 1;
const MSG_RESPONSE = 2;
/** Exported for the packet thread (core/datapath/packet-worker.ts), which reads DATA messages itself. */
export const MSG_DATA = 4;

/** type u8 || receiver index u32 || counter u64. */
export const DATA_HEADER = 13;
export const TAG_LENGTH = 16;
/** Bytes a data record adds to a session payload: header, record type, tag. */
export const DATAGRAM_RECORD_OVERHEAD = DATA_HEADER + 1 + TAG_LENGTH;

/** The datagram size that carries a session payload of `payload` bytes. */
export function datagramSizeFor(payload: number): number {
  return payload + DATAGRAM_RECORD_OVERHEAD;
}

/** e (32) + encrypted s (32 + 16) + encrypted payload (timestamp 12 + tag 16), after type and index. */
const MIN_INITIATION = 5 + 32 + 48 + 12 + TAG_LENGTH;
/** e (32) + encrypted payload (tag 16), after type and two indices. */
const MIN_RESPONSE = 9 + 32 + TAG_LENGTH;
const MIN_DATA = DATA_HEADER + TAG_LENGTH;

// Record types inside the AEAD.
const DATA = 0;
export const RECORD_DATA = DATA;
const REKEY_INIT = 1;
const REKEY_RESPONSE = 2;
const CLOSE = 3;
const CONFIRM = 4;

// ---------------------------------------------------------------------------
// Timing and limits

const DEFAULT_REKEY_AFTER_MS = 120_000;
const DEFAULT_REJECT_AFTER_MS = 180_000;
const DEFAULT_IDLE_TIMEOUT_MS = 180_000;
/** The client rekeys after this many records under one key (as stream sessions). */
const REKEY_AFTER_RECORDS = 2 ** 48;
/** Handshake retransmission: 1 s, doubling, up to this. */
const RETRANSMIT_START_MS = 1000;
const RETRANSMIT_MAX_MS = 8000;
/** Answered-but-unread handshakes remembered by a client (one per retransmission). */
const MAX_PENDING_HANDSHAKES = 8;
/** A side that received data and has sent nothing for this long sends a keepalive. */
const PASSIVE_KEEPALIVE_MS = 10_000;
/** Payload bytes held for a session whose owner has not called start() yet; beyond this they are dropped. */
const PRESTART_QUEUE_LIMIT = 1 << 20;

/** Server defaults (see DatagramAcceptOptions). */
const DEFAULT_MAX_HALF_OPEN = 1024;
const HALF_OPEN_PER_CLIENT = 8;
const DEFAULT_HANDSHAKES_PER_SECOND = 1000;
const DEFAULT_HANDSHAKES_PER_SOURCE = 20;
/** Sources tracked by the per-source limiter before it starts over (bounded memory). */
const MAX_TRACKED_SOURCES = 4096;
/** Refusals reported (onRefused) per second at most: garbage must not flood the logs. */
const REFUSALS_REPORTED_PER_SECOND = 10;
/** At most one warning this often that the handshake rate limits turned initiations away. */
const RATE_LIMIT_WARNING_MS = 60_000;

// ---------------------------------------------------------------------------
// Keys and indices

/** One set of transport keys and everything that goes with it. */
interface Keypair {
  /** The receiver index the peer writes on records to us (ours, unique in our table). */
  readonly localIndex: number;
  /** The receiver index we write on records to the peer. */
  readonly remoteIndex: number;
  readonly send: CipherState;
  readonly receive: CipherState;
  /** The next send counter: never repeats under one key. */
  sendCounter: number;
  /** Once the packet thread may send under these keys too: the next send counter, shared (Atomics.add reserves one). */
  sharedCounter: BigInt64Array | null;
  readonly window: ReplayWindow;
  readonly bornAt: number;
  /** The packet thread holds these keys too (their replay window is shared with it). */
  handedOver: boolean;
}

function keypairFrom(keys: TransportKeys, localIndex: number, remoteIndex: number): Keypair {
  return { localIndex, remoteIndex, send: keys.send, receive: keys.receive, sendCounter: 0, sharedCounter: null, window: new ReplayWindow(), bornAt: Date.now(), handedOver: false };
}

/** The next send counter of `kp`, reserved (both threads may send under it; see sharedCounter). */
function takeCounter(kp: Keypair): number {
  if (kp.sharedCounter !== null) return Number(Atomics.add(kp.sharedCounter, 0, 1n));
  return kp.sendCounter++;
}

/** Records sent (counters taken) under `kp` so far. */
function countersTaken(kp: Keypair): number {
  return kp.sharedCounter !== null ? Number(Atomics.load(kp.sharedCounter, 0)) : kp.sendCounter;
}

/** Where a receiver index leads: the session and the keys to try. */
interface IndexEntry {
  session: DatagramSession;
  keypair: Keypair;
}

/** Receiver indices in use on one endpoint: random, non-zero, unique. */
class IndexTable {
  private readonly map = new Map<number, IndexEntry | null>();

  /** A fresh index, reserved (looked up as nothing) until set(). */
  reserve(): number {
    for (;;) {
      const index = randomInt(1, 0x1_0000_0000);
      if (!this.map.has(index)) {
        this.map.set(index, null);
        return index;
      }
    }
  }
  set(entry: IndexEntry): void {
    this.map.set(entry.keypair.localIndex, entry);
  }
  get(index: number): IndexEntry | null | undefined {
    return this.map.get(index);
  }
  delete(index: number): void {
    this.map.delete(index);
    this.onDelete?.(index);
  }
  /** Told of every index deleted (the packet thread forgets keys it holds). */
  onDelete: ((index: number) => void) | undefined;

  /** A MSG_DATA datagram: to the session its receiver index names, if any (else dropped). */
  deliverData(data: Buffer, from: string): void {
    if (data.length < MIN_DATA) return;
    const entry = this.map.get(data.readUInt32LE(1));
    if (entry) entry.session.onDataRecord(entry.keypair, data, from);
  }
}

/**
 * An endpoint's packet thread (core/datapath/), for sessions in TUN mode:
 * started by the first session that offloads its packets, stopped with the
 * endpoint. Where it cannot run (no handOffReceive, a cipher without a
 * thread AEAD, no koffi) sessions simply keep everything on the main thread.
 * If it fails later, the sessions go on without it: the endpoint and the
 * TUN are read on the main thread again, and the replay windows and send
 * counters the thread shared are the sessions' own memory.
 */
class PacketThreadSlot {
  /** undefined: not tried yet; null: cannot run here (not tried again). */
  private thread: PacketThread | null | undefined;
  /** Sessions relying on the thread, by the id of their sink. */
  private readonly users = new Map<number, DatagramSession>();
  /** Indices whose keys the thread holds, so only those deletions are sent to it. */
  private readonly handedOver = new Set<number>();

  constructor(
    private readonly endpoint: DatagramEndpoint,
    private readonly indices: IndexTable,
    private readonly deliver: (data: Buffer, from: string) => void,
    private readonly log: Logger,
  ) {}

  /** The thread, started on first use with the cipher's thread AEAD; null where it cannot run. */
  acquire(aead: ThreadAeadRef): PacketThread | null {
    if (this.thread === undefined) {
      this.thread =
        PacketThread.start(this.endpoint, aead, {
          raw: (data, from) => this.deliver(data, from),
          opened: (index, plaintext, length, from) => {
            const entry = this.indices.get(index);
            if (entry) entry.session.onOpenedRecord(entry.keypair, plaintext, length, from);
          },
          tunPacket: (sink, packet) => this.users.get(sink)?.onReadBack(packet),
          ended: (reason) => this.failed(reason),
        }) ?? null;
      if (this.thread !== null) {
        this.log.debug('TUN packets take a packet thread of their own (udp)');
        this.indices.onDelete = (index) => {
          if (this.handedOver.delete(index)) this.thread?.drop(index);
        };
      }
    }
    return this.thread !== null && this.thread.running ? this.thread : null;
  }

  /** `session` now relies on the thread (it gave it a sink and keys). */
  register(session: DatagramSession, sink: number): void {
    this.users.set(sink, session);
  }

  /** A datagram reached the main thread (the thread hands reading back after a quiet spell). */
  noteDatagram(): void {
    this.thread?.noteDatagram();
  }

  handOver(thread: PacketThread, command: Parameters<PacketThread['handOver']>[0]): void {
    this.handedOver.add(command.index);
    thread.handOver(command);
  }

  release(session: DatagramSession, sink: ThreadSink): void {
    if (this.users.get(sink.id) === session && this.users.delete(sink.id)) this.thread?.removeSink(sink.id);
  }

  /** Stop the thread (the endpoint is closing). */
  close(): void {
    if (this.thread) this.log.debug('udp packet thread stopped', { ...this.thread.counts, warmUp: this.thread.warmUp });
    this.thread?.close();
    this.thread = null;
    this.users.clear();
  }

  private failed(reason: string): void {
    this.log.warn(`the udp packet thread stopped (${reason}); packets take the main thread from now on`);
    this.thread = null;
    this.users.clear();
  }
}

/** An IPv4 address as a big-endian word, or null if `text` is not one. */
function ipWord(text: string): number | null {
  const bytes = ipBytes(text, 4);
  return bytes === null ? null : bytes.readUInt32BE(0);
}

/** The bytes of an address of `length` bytes (4: IPv4, 16: IPv6), or null if `text` is not one. */
function ipBytes(text: string, length: 4 | 16): Buffer | null {
  const ip = parseIp(text);
  if (ip === null) return null;
  const bytes = ipToBytes(ip);
  return bytes.length === length ? bytes : null;
}

function readCounter(data: Buffer, at: number): number {
  const high = data.readUInt32LE(at + 4);
  // Above 2^53 the number is not exact; no honest peer gets there (it must rekey long before).
  if (high >= 0x200000) return -1;
  return high * 0x1_0000_0000 + data.readUInt32LE(at);
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function tunnelDown(message: string): DshieldError {
  return new DshieldError(ErrorCodes.TUNNEL_DOWN, message);
}

// ---------------------------------------------------------------------------
// The session

/** Client: rekey handshakes sent and not answered yet, by the index they asked to be answered on. */
type PendingRekeys = Map<number, HandshakeState>;

interface DatagramSessionInit {
  side: 'client' | 'server';
  endpoint: DatagramEndpoint;
  indices: IndexTable;
  /** The endpoint's packet thread, for offloadPackets. */
  receiver: PacketThreadSlot;
  peerAddress: string;
  keypair: Keypair;
  peer?: ClientIdentity;
  params: Record<string, unknown>;
  log: Logger;
  rekeyAfterMs: number;
  rejectAfterMs: number;
  idleTimeoutMs: number;
  /** Client: fresh initiators for rekeys. */
  newInitiator?: () => HandshakeState;
  /** Server: answer a rekey message 1 from this session's client (null: refused, already logged). */
  answerRekey?: (message1: Buffer) => { message2: Buffer; keys: TransportKeys } | null;
  /** The first record under this session's keys authenticated (the peer has the keys). */
  onConfirmed?: (session: DatagramSession) => void;
  /** The session is over (closed, destroyed, or expired before confirmation): release what it holds. */
  onGone: (session: DatagramSession) => void;
  bytesIn: number;
  bytesOut: number;
}

/**
 * Memory payloadBuffer() hands out, shared by every datagram session of the
 * process: an endpoint that sends at once (pending 0) leaves it free for the
 * next payload, so the data path allocates nothing per datagram.
 */
let spareDatagram: Buffer | null = null;
/** Bytes of a data record before its payload: header and record type. */
const PAYLOAD_OFFSET = DATA_HEADER + 1;

class DatagramSession implements Session {
  readonly side: 'client' | 'server';
  readonly lossy = true;
  readonly peer?: ClientIdentity;
  readonly params: Record<string, unknown>;
  readonly maxPayload: number;
  bytesIn: number;
  bytesOut: number;
  lastReceivedAt = Date.now();
  /** Completed rekeys (for logs and tests). */
  rekeys = 0;
  /** True once a record under the session's keys authenticated (server: the client confirmed). */
  confirmed = false;
  /** Server: send() returned false; owed a drain. */
  wantsDrain = false;

  private peerAddress: string;
  private readonly endpoint: DatagramEndpoint;
  private readonly indices: IndexTable;
  private readonly log: Logger;
  private readonly init: DatagramSessionInit;

  private current: Keypair;
  /** Receive only: the keys before the last rekey, for records still in flight. */
  private previous: Keypair | null = null;
  /** Server: answered rekeys, not yet used by the client (the first one used wins). */
  private nexts: Keypair[] = [];
  /** Client: rekey handshakes waiting for their answer. */
  private readonly pendingRekeys: PendingRekeys = new Map();
  private rekeyStartedAt = 0;
  private rekeyResendAt = 0;

  private handlers: SessionHandlers | null = null;
  private queued: Buffer[] = [];
  private queuedBytes = 0;
  private drainPending = false;
  private closeResult: { err?: Error } | null = null;
  private closeDelivered = false;
  private state: 'open' | 'closed' = 'open';
  private readonly tick: NodeJS.Timeout;
  private lastSentAt = Date.now();
  private lastDataReceivedAt = 0;
  /** Set by offloadPackets: the packet thread writes this session's packets; its counters as last read. */
  private offload: {
    thread: PacketThread;
    sink: ThreadSink;
    readBack: ((packet: Buffer) => void) | undefined;
    records: number;
    dataRecords: number;
    bytes: number;
    sent: number;
    sentBytes: number;
  } | null = null;

  constructor(init: DatagramSessionInit) {
    this.init = init;
    this.side = init.side;
    this.endpoint = init.endpoint;
    this.indices = init.indices;
    this.peerAddress = init.peerAddress;
    this.peer = init.peer;
    this.params = init.params;
    this.log = init.log;
    this.maxPayload = init.endpoint.maxDatagramSize - DATAGRAM_RECORD_OVERHEAD;
    this.bytesIn = init.bytesIn;
    this.bytesOut = init.bytesOut;
    this.current = init.keypair;
    this.indices.set({ session: this, keypair: this.current });
    // One housekeeping timer per session, fine enough for the shortest deadline it watches.
    const tickMs = Math.max(20, Math.min(1000, init.rekeyAfterMs / 8, init.rejectAfterMs / 8, init.idleTimeoutMs / 8));
    this.tick = setInterval(() => this.housekeeping(), tickMs);
    this.tick.unref();
  }

  get remoteAddress(): string {
    return this.peerAddress;
  }

  // --- Session API

  start(handlers: SessionHandlers): void {
    if (this.handlers !== null) throw new Error('session.start() called twice');
    this.handlers = handlers;
    const queued = this.queued;
    this.queued = [];
    this.queuedBytes = 0;
    for (const payload of queued) {
      if (this.closeDelivered) break;
      this.deliver(payload);
    }
    if (this.drainPending && this.state === 'open') {
      this.drainPending = false;
      handlers.drain();
    }
    if (this.closeResult !== null) this.deliverClose();
  }

  send(payload: Buffer): boolean {
    if (this.state !== 'open') return false;
    if (payload.length > this.maxPayload) {
      throw new RangeError(`session payload of ${payload.length} bytes exceeds maxPayload ${this.maxPayload}`);
    }
    const ok = this.sendRecord(DATA, payload);
    if (!ok) this.wantsDrain = true;
    return ok;
  }

  payloadBuffer(): Buffer {
    const size = PAYLOAD_OFFSET + this.maxPayload + TAG_LENGTH;
    // Its own ArrayBuffer (not the Buffer pool), so sendInPlace can tell it from any other memory.
    if (spareDatagram === null || spareDatagram.length < size) spareDatagram = Buffer.allocUnsafeSlow(size);
    return spareDatagram.subarray(PAYLOAD_OFFSET, PAYLOAD_OFFSET + this.maxPayload);
  }

  sendInPlace(payload: Buffer): boolean {
    if (this.state !== 'open') return false;
    if (payload.length > this.maxPayload) {
      throw new RangeError(`session payload of ${payload.length} bytes exceeds maxPayload ${this.maxPayload}`);
    }
    const memory = payload.buffer;
    const start = payload.byteOffset - PAYLOAD_OFFSET;
    if (start < 0 || payload.byteOffset + payload.length + TAG_LENGTH > memory.byteLength) return this.send(payload);
    // Unless the endpoint sends it at once, it keeps the memory: the next payload needs new.
    let reusable = false;
    try {
      const out = Buffer.from(memory, start, PAYLOAD_OFFSET + payload.length + TAG_LENGTH);
      out[DATA_HEADER] = DATA;
      const ok = this.seal(out, 1 + payload.length);
      reusable = this.endpoint.pending === 0;
      if (!ok) this.wantsDrain = true;
      return ok;
    } finally {
      if (!reusable && spareDatagram !== null && spareDatagram.buffer === memory) spareDatagram = null;
    }
  }

  sendBatch(payloads: Buffer[]): boolean {
    let ok = true;
    for (const p of payloads) ok = this.send(p) && ok;
    return ok;
  }

  offloadPackets(sink: PacketSink): (() => void) | undefined {
    if (this.state !== 'open' || this.offload !== null) return undefined;
    const aead = this.current.receive.cipher.thread;
    if (aead === undefined) return undefined;
    const source4 = sink.source4 === undefined ? -1 : ipWord(sink.source4);
    const source6 = sink.source6 === undefined ? null : ipBytes(sink.source6, 16);
    if (source4 === null || (sink.source6 !== undefined && source6 === null)) return undefined;
    const thread = this.init.receiver.acquire(aead);
    if (thread === null) return undefined;
    let rxSink: ThreadSink;
    try {
      rxSink = thread.addSink(sink, source4, source6, this.side === 'server' ? this.peerAddress : null, this.peerAddress);
    } catch (err) {
      this.log.debug('packets stay on the main thread', { error: errorText(err) });
      return undefined;
    }
    if (sink.lendReader !== undefined) thread.borrowReader(sink.lendReader);
    const offload = { thread, sink: rxSink, readBack: sink.readBack, records: 0, dataRecords: 0, bytes: 0, sent: 0, sentBytes: 0 };
    this.offload = offload;
    this.init.receiver.register(this, rxSink.id);
    if (this.previous !== null) this.handOver(this.previous);
    this.handOver(this.current);
    this.shareSending(this.current);
    return () => {
      if (this.offload !== offload) return;
      this.foldThreadCounts(Date.now());
      this.offload = null;
      this.init.receiver.release(this, offload.sink);
    };
  }

  close(): void {
    if (this.state !== 'open') return;
    // One datagram, which may be lost: then the peer notices by its keepalive or idle timeout.
    this.sendRecord(CLOSE, null);
    this.end(undefined);
  }

  destroy(err?: Error): void {
    if (this.state !== 'open') return;
    this.end(err);
  }

  // --- from the endpoint (via the acceptor or the client's connect)

  /** A MSG_DATA datagram whose receiver index led to `keypair`. Never throws; drops what does not authenticate. */
  onDataRecord(keypair: Keypair, data: Buffer, from: string): void {
    if (this.state !== 'open' || data.length < MIN_DATA) return;
    const counter = readCounter(data, 5);
    if (!keypair.window.check(counter, MAX_COUNTER)) return;
    const now = Date.now();
    if (now - keypair.bornAt >= this.init.rejectAfterMs) return;
    // In place: the datagram is ours, and no other key will be tried on it.
    const plaintext = keypair.receive.decryptAt(counter, data.subarray(0, DATA_HEADER), data.subarray(DATA_HEADER), data.subarray(DATA_HEADER, data.length - TAG_LENGTH));
    if (plaintext === null) return;
    // The packet thread may have accepted it meanwhile (the window is shared with it then).
    if (!keypair.window.accept(counter, MAX_COUNTER)) return;
    this.afterRecord(keypair, plaintext, data.length, from, now);
  }

  /** A record the packet thread opened and accepted into its window: everything but the packets it writes itself. */
  onOpenedRecord(keypair: Keypair, plaintext: Buffer, length: number, from: string): void {
    if (this.state !== 'open') return;
    this.afterRecord(keypair, plaintext, length, from, Date.now());
  }

  /** What follows an authentic, new record of `length` bytes on the wire. */
  private afterRecord(keypair: Keypair, plaintext: Buffer, length: number, from: string, now: number): void {
    this.bytesIn += length;
    this.lastReceivedAt = now;
    if (from !== this.peerAddress && this.side === 'server') {
      this.log.debug('peer roamed', { client: this.peer?.name, from: this.peerAddress, to: from });
      this.peerAddress = from;
      this.offload?.thread.setPeer(this.offload.sink.id, from);
    }
    if (keypair !== this.current && this.nexts.includes(keypair)) this.useNext(keypair);
    if (!this.confirmed) {
      this.confirmed = true;
      this.init.onConfirmed?.(this);
      if (this.state !== 'open') return;
    }
    if (plaintext.length === 0) return; // keepalive
    switch (plaintext[0]) {
      case DATA:
        this.lastDataReceivedAt = now;
        this.deliver(plaintext.subarray(1));
        break;
      case REKEY_INIT:
        this.onRekeyInit(plaintext.subarray(1));
        break;
      case REKEY_RESPONSE:
        this.onRekeyResponse(plaintext.subarray(1));
        break;
      case CLOSE:
        this.end(undefined);
        break;
      case CONFIRM:
        if (this.side === 'server') this.sendRecord(null, null); // the client waits for any record
        break;
      default:
        break; // a type from a later version
    }
  }

  onDrain(): void {
    this.wantsDrain = false;
    if (this.state !== 'open') return;
    if (this.handlers === null) this.drainPending = true;
    else this.handlers.drain();
  }

  /** The endpoint went away under the session. */
  onEndpointClose(err?: Error): void {
    if (this.state !== 'open') return;
    this.end(err ?? tunnelDown('the UDP socket closed'));
  }

  /** Client: send CONFIRM (while connecting). */
  sendConfirm(): void {
    this.sendRecord(CONFIRM, null);
  }

  /** Server: an unconfirmed session expired, or the acceptor shuts down: go without a word or a close handler. */
  discard(): void {
    if (this.state !== 'open') return;
    this.state = 'closed';
    this.closeResult = {};
    this.closeDelivered = true;
    this.cleanup();
  }

  // --- sending

  /**
   * Seals and sends one record under the current keys. `type` null with no
   * body is a keepalive (empty plaintext). Returns the endpoint's answer
   * (false: wait for drain; the record may have been dropped).
   */
  private sendRecord(type: number | null, body: Buffer | null): boolean {
    const bodyLength = body === null ? 0 : body.length;
    const plainLength = type === null ? 0 : 1 + bodyLength;
    // The datagram is assembled once and sealed in place after its header.
    const out = Buffer.allocUnsafe(DATA_HEADER + plainLength + TAG_LENGTH);
    if (type !== null) {
      out[DATA_HEADER] = type;
      if (body !== null) out.set(body, PAYLOAD_OFFSET);
    }
    return this.seal(out, plainLength);
  }

  /**
   * Writes the header into `out` (DATA_HEADER + plainLength + TAG_LENGTH
   * bytes, the plaintext after the header), seals the plaintext in place
   * under the current keys and sends the datagram.
   */
  private seal(out: Buffer, plainLength: number): boolean {
    const kp = this.current;
    const counter = takeCounter(kp);
    if (counter >= MAX_COUNTER) {
      this.end(protocolError('the session ran out of record counters before a rekey'));
      return false;
    }
    out[0] = MSG_DATA;
    out.writeUInt32LE(kp.remoteIndex, 1);
    out.writeUInt32LE(counter >>> 0, 5);
    out.writeUInt32LE(Math.floor(counter / 0x1_0000_0000), 9);
    const plaintext = out.subarray(DATA_HEADER, DATA_HEADER + plainLength);
    const sealedAt = out.subarray(DATA_HEADER);
    let sealed: Buffer;
    try {
      sealed = kp.send.encryptAt(counter, out.subarray(0, DATA_HEADER), plaintext, sealedAt);
    } catch (err) {
      this.end(protocolError('the cipher failed to encrypt a record', err));
      return false;
    }
    if (sealed !== sealedAt) sealed.copy(out, DATA_HEADER);
    this.bytesOut += out.length;
    this.lastSentAt = Date.now();
    return this.endpoint.send(out, this.peerAddress);
  }

  // --- receiving

  private deliver(payload: Buffer): void {
    const handlers = this.handlers;
    if (handlers === null) {
      // Before start(): keep a bounded amount; beyond it, drop (the network may drop too).
      if (this.queuedBytes + payload.length > PRESTART_QUEUE_LIMIT) return;
      this.queued.push(payload);
      this.queuedBytes += payload.length;
      return;
    }
    try {
      handlers.message(payload);
    } catch (err) {
      this.log.error('session message handler threw', { error: errorText(err) });
      this.destroy(err instanceof Error ? err : new Error(String(err)));
    }
  }

  // --- rekey

  /** Client: a new handshake inside the session; resent (fresh) until answered. */
  private startRekey(now: number): void {
    const newInitiator = this.init.newInitiator;
    if (newInitiator === undefined || this.state !== 'open') return;
    let hs: HandshakeState;
    let message1: Buffer;
    try {
      hs = newInitiator();
      message1 = writeInitiation(hs, {});
    } catch (err) {
      this.end(protocolError('could not start a rekey handshake', err));
      return;
    }
    const index = this.indices.reserve();
    this.pendingRekeys.set(index, hs);
    if (this.pendingRekeys.size > MAX_PENDING_HANDSHAKES) {
      const oldest = this.pendingRekeys.keys().next().value!;
      this.pendingRekeys.delete(oldest);
      this.indices.delete(oldest);
    }
    if (this.rekeyStartedAt === 0) this.rekeyStartedAt = now;
    this.rekeyResendAt = now + Math.min(RETRANSMIT_START_MS, Math.max(50, this.init.rekeyAfterMs / 4));
    const body = Buffer.allocUnsafe(4 + message1.length);
    body.writeUInt32LE(index, 0);
    message1.copy(body, 4);
    this.sendRecord(REKEY_INIT, body);
    this.log.debug('rekey started', { pending: this.pendingRekeys.size });
  }

  /** Server: answer under the current keys; keep the new keys pending until the client uses them. */
  private onRekeyInit(body: Buffer): void {
    const answerRekey = this.init.answerRekey;
    if (answerRekey === undefined || body.length < 4) return;
    const clientIndex = body.readUInt32LE(0);
    let answer: { message2: Buffer; keys: TransportKeys } | null;
    try {
      answer = answerRekey(Buffer.from(body.subarray(4)));
    } catch (err) {
      this.log.debug('rekey answer failed', { error: errorText(err) });
      return;
    }
    if (answer === null) return;
    const next = keypairFrom(answer.keys, this.indices.reserve(), clientIndex);
    this.indices.set({ session: this, keypair: next });
    this.nexts.push(next);
    if (this.nexts.length > MAX_PENDING_HANDSHAKES) this.indices.delete(this.nexts.shift()!.localIndex);
    const reply = Buffer.allocUnsafe(8 + answer.message2.length);
    reply.writeUInt32LE(next.localIndex, 0);
    reply.writeUInt32LE(clientIndex, 4);
    answer.message2.copy(reply, 8);
    this.sendRecord(REKEY_RESPONSE, reply);
  }

  /** Client: switch to the answered keys at once and confirm them with a keepalive. */
  private onRekeyResponse(body: Buffer): void {
    if (body.length < 8) return;
    const serverIndex = body.readUInt32LE(0);
    const clientIndex = body.readUInt32LE(4);
    const hs = this.pendingRekeys.get(clientIndex);
    if (hs === undefined) return; // a late answer to a retransmission: already rekeyed
    let keys: TransportKeys;
    try {
      hs.readMessage(body.subarray(8));
      keys = hs.split();
    } catch (err) {
      this.log.debug('a rekey answer failed to authenticate', { error: errorText(err) });
      this.pendingRekeys.delete(clientIndex);
      this.indices.delete(clientIndex);
      return;
    }
    this.pendingRekeys.delete(clientIndex);
    for (const index of this.pendingRekeys.keys()) this.indices.delete(index);
    this.pendingRekeys.clear();
    this.rekeyStartedAt = 0;
    const next = keypairFrom(keys, clientIndex, serverIndex);
    this.indices.set({ session: this, keypair: next });
    this.retire(this.current);
    this.current = next;
    this.handOver(next);
    this.shareSending(next);
    this.sendRecord(null, null); // tells the server the new keys are in use
    this.rekeyed();
  }

  /** Server: the client used `next`: it becomes current; the others answered are dropped. */
  private useNext(next: Keypair): void {
    for (const other of this.nexts) if (other !== next) this.indices.delete(other.localIndex);
    this.nexts = [];
    this.retire(this.current);
    this.current = next;
    this.handOver(next);
    this.shareSending(next);
    this.rekeyed();
  }

  /** `old` stays valid for receiving (records in flight) until it expires or the next rekey. */
  private retire(old: Keypair): void {
    if (this.previous !== null) this.indices.delete(this.previous.localIndex);
    this.previous = old;
  }

  /** Give the packet thread `kp`'s receiving key and replay window (when packets are offloaded). */
  private handOver(kp: Keypair): void {
    const offload = this.offload;
    if (offload === null || kp.handedOver) return;
    const key = kp.receive.exportKey();
    if (key === null) return;
    kp.handedOver = true;
    this.init.receiver.handOver(offload.thread, {
      op: 'keys',
      index: kp.localIndex,
      sink: offload.sink.id,
      key,
      bornAt: kp.bornAt,
      rejectAfterMs: this.init.rejectAfterMs,
      window: kp.window.share(),
    });
  }

  /** Let the packet thread send under `kp` (the current keys) too: its counter becomes shared. */
  private shareSending(kp: Keypair): void {
    const offload = this.offload;
    if (offload === null) return;
    const key = kp.send.exportKey();
    if (key === null) return;
    if (kp.sharedCounter === null) {
      kp.sharedCounter = new BigInt64Array(new SharedArrayBuffer(8));
      kp.sharedCounter[0] = BigInt(kp.sendCounter);
    }
    offload.thread.setSending(offload.sink.id, key, kp.remoteIndex, kp.sharedCounter.buffer as SharedArrayBuffer);
  }

  /** A packet the packet thread read from our TUN and could not send: as if the TUN had read it. */
  onReadBack(packet: Buffer): void {
    try {
      this.offload?.readBack?.(packet);
    } catch (err) {
      this.log.error('a packet read-back handler threw', { error: errorText(err) });
    }
  }

  /** Take in what the packet thread counted since the last look: it stands for records we did not see. */
  private foldThreadCounts(now: number): void {
    const offload = this.offload;
    if (offload === null) return;
    const stats = offload.sink.stats;
    const records = Atomics.load(stats, STAT_RECORDS);
    const dataRecords = Atomics.load(stats, STAT_DATA_RECORDS);
    const bytes = Atomics.load(stats, STAT_BYTES);
    const sent = Atomics.load(stats, STAT_SENT_RECORDS);
    const sentBytes = Atomics.load(stats, STAT_SENT_BYTES);
    if (records !== offload.records) this.lastReceivedAt = now;
    if (dataRecords !== offload.dataRecords) this.lastDataReceivedAt = now;
    if (sent !== offload.sent) this.lastSentAt = now;
    // Differences modulo 2^32: the counters wrap (see STAT_BYTES).
    this.bytesIn += (bytes - offload.bytes) >>> 0;
    this.bytesOut += (sentBytes - offload.sentBytes) >>> 0;
    offload.records = records;
    offload.dataRecords = dataRecords;
    offload.bytes = bytes;
    offload.sent = sent;
    offload.sentBytes = sentBytes;
  }

  private rekeyed(): void {
    this.rekeys++;
    this.log.debug('rekeyed', { side: this.side, client: this.peer?.name, rekeys: this.rekeys });
    try {
      this.handlers?.rekey?.();
    } catch (err) {
      this.log.error('session rekey handler threw', { error: errorText(err) });
    }
  }

  // --- timers

  private housekeeping(): void {
    if (this.state !== 'open') return;
    const now = Date.now();
    this.foldThreadCounts(now);
    const { rekeyAfterMs, rejectAfterMs, idleTimeoutMs } = this.init;
    if (now - this.lastReceivedAt >= idleTimeoutMs) {
      this.end(tunnelDown(`no authenticated record from the peer for ${Math.round(idleTimeoutMs / 1000)} s: the session expired`));
      return;
    }
    if (this.previous !== null && now - this.previous.bornAt >= rejectAfterMs) {
      this.indices.delete(this.previous.localIndex);
      this.previous = null;
    }
    const age = now - this.current.bornAt;
    if (age >= rejectAfterMs) {
      if (this.nexts.length > 0) {
        // The client has answered keys it never used: the old ones expire now, so use the newest.
        this.useNext(this.nexts[this.nexts.length - 1]!);
      } else {
        this.end(protocolError(`the session keys are older than ${rejectAfterMs} ms and no rekey completed: closing the session`));
        return;
      }
    }
    if (this.init.newInitiator !== undefined) {
      const wornOut = age >= rekeyAfterMs || countersTaken(this.current) >= REKEY_AFTER_RECORDS;
      if (this.pendingRekeys.size === 0 ? wornOut : now >= this.rekeyResendAt) this.startRekey(now);
    }
    if (this.lastDataReceivedAt > this.lastSentAt && now - this.lastDataReceivedAt >= PASSIVE_KEEPALIVE_MS) {
      this.sendRecord(null, null);
    }
  }

  // --- ending

  private end(err: Error | undefined): void {
    if (this.state !== 'open') return;
    this.state = 'closed';
    this.cleanup();
    this.closeResult = err === undefined ? {} : { err };
    if (this.handlers !== null) this.deliverClose();
  }

  private cleanup(): void {
    clearInterval(this.tick);
    if (this.offload !== null) {
      this.foldThreadCounts(Date.now());
      this.init.receiver.release(this, this.offload.sink);
      this.offload = null;
    }
    this.indices.delete(this.current.localIndex);
    if (this.previous !== null) this.indices.delete(this.previous.localIndex);
    for (const next of this.nexts) this.indices.delete(next.localIndex);
    for (const index of this.pendingRekeys.keys()) this.indices.delete(index);
    this.nexts = [];
    this.pendingRekeys.clear();
    this.queued = [];
    try {
      this.init.onGone(this);
    } catch (err) {
      this.log.error('session cleanup failed', { error: errorText(err) });
    }
  }

  private deliverClose(): void {
    if (this.closeDelivered) return;
    this.closeDelivered = true;
    try {
      this.handlers!.close(this.closeResult!.err);
    } catch (err) {
      this.log.error('session close handler threw', { error: errorText(err) });
    }
  }
}

// ---------------------------------------------------------------------------
// Client

export interface DatagramConnectOptions extends ClientHandshakeOptions {
  /** Close the session after this long without an authenticated record (default 180_000). */
  idleTimeoutMs?: number;
}

/**
 * Run the handshake as the client over `endpoint` (fresh, not started; the
 * session owns it from now on and closes it when it ends) with the server
 * at `serverAddress` (numeric "ip:port"). Retransmits the initiation with
 * backoff; resolves once the server confirmed the session. Rejects with
 * DshieldError HANDSHAKE_TIMEOUT (no answer within handshakeTimeoutMs),
 * SERVER_KEY_MISMATCH (only answers that failed to authenticate), PROTOCOL
 * (an authentic answer that is malformed) or KEY (bad local keys), and then
 * closes the endpoint.
 */
export function connectDatagramSession(endpoint: DatagramEndpoint, serverAddress: string, opts: DatagramConnectOptions): Promise<Session> {
  return new Promise<Session>((resolve, reject) => {
    const log = opts.log;
    const timeoutMs = opts.handshakeTimeoutMs;
    const indices = new IndexTable();
    const onDatagram = (data: Buffer, from: string): void => {
      if (data.length === 0) return;
      receiver.noteDatagram();
      const type = data[0];
      if (type === MSG_DATA) {
        indices.deliverData(data, from);
      } else if (type === MSG_RESPONSE && !settled) {
        onResponse(data);
      }
    };
    const receiver = new PacketThreadSlot(endpoint, indices, onDatagram, log);
    const pending = new Map<number, HandshakeState>();
    let newInitiator: () => HandshakeState;
    try {
      newInitiator = initiatorFactory(opts);
    } catch (err) {
      endpoint.close();
      reject(new DshieldError(ErrorCodes.KEY, `cannot start the handshake: ${errorText(err)}`, { cause: err }));
      return;
    }
    let session: DatagramSession | null = null;
    let settled = false;
    let mismatch: DshieldError | undefined;
    let attempts = 0;
    let bytesOut = 0;
    let bytesIn = 0;
    let retransmitTimer: NodeJS.Timeout | undefined;
    let delay = RETRANSMIT_START_MS;

    const fail = (err: DshieldError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(deadline);
      clearTimeout(retransmitTimer);
      session?.discard();
      endpoint.close();
      log.debug('handshake failed', { code: err.code, remote: serverAddress, attempts });
      reject(err);
    };
    const deadline = setTimeout(() => {
      fail(
        mismatch ??
          new DshieldError(
            ErrorCodes.HANDSHAKE_TIMEOUT,
            `the server did not answer the handshake within ${timeoutMs} ms (${attempts} attempts over UDP to ${serverAddress}; ` +
              `a firewall may block UDP): ${TIMEOUT_ADVICE}`,
          ),
      );
    }, timeoutMs);

    /** Before the answer: a fresh initiation. After it: CONFIRM, until the server's keepalive. */
    const transmit = (): void => {
      if (settled) return;
      attempts++;
      if (session !== null) {
        session.sendConfirm();
      } else {
        let message1: Buffer;
        let index: number;
        try {
          const hs = newInitiator();
          message1 = writeInitiation(hs, opts.payload ?? {});
          index = indices.reserve();
          pending.set(index, hs);
        } catch (err) {
          fail(new DshieldError(ErrorCodes.KEY, `cannot start the handshake: ${errorText(err)}`, { cause: err }));
          return;
        }
        if (pending.size > MAX_PENDING_HANDSHAKES) {
          const oldest = pending.keys().next().value!;
          pending.delete(oldest);
          indices.delete(oldest);
        }
        const datagram = Buffer.allocUnsafe(5 + message1.length);
        datagram[0] = MSG_INITIATION;
        datagram.writeUInt32LE(index, 1);
        message1.copy(datagram, 5);
        if (datagram.length > endpoint.maxDatagramSize) {
          fail(new DshieldError(ErrorCodes.INTERNAL, 'the handshake payload is too large for one datagram'));
          return;
        }
        bytesOut += datagram.length;
        endpoint.send(datagram, serverAddress);
      }
      retransmitTimer = setTimeout(transmit, delay);
      delay = Math.min(delay * 2, RETRANSMIT_MAX_MS);
    };

    const onResponse = (data: Buffer): void => {
      if (session !== null || data.length < MIN_RESPONSE) return;
      const serverIndex = data.readUInt32LE(1);
      const clientIndex = data.readUInt32LE(5);
      const hs = pending.get(clientIndex);
      if (hs === undefined) return;
      pending.delete(clientIndex);
      let params: Record<string, unknown>;
      try {
        params = readResponse(hs, data.subarray(9));
      } catch (err) {
        indices.delete(clientIndex);
        const e = err as DshieldError;
        // Anyone can send a forged answer: remember it for the verdict, keep waiting for the real one.
        if (e.code === ErrorCodes.SERVER_KEY_MISMATCH) mismatch = e;
        else fail(e);
        return;
      }
      bytesIn += data.length;
      for (const index of pending.keys()) indices.delete(index);
      pending.clear();
      session = new DatagramSession({
        side: 'client',
        endpoint,
        indices,
        receiver,
        peerAddress: serverAddress,
        keypair: keypairFrom(hs.split(), clientIndex, serverIndex),
        params,
        log,
        rekeyAfterMs: opts.rekeyAfterMs ?? DEFAULT_REKEY_AFTER_MS,
        rejectAfterMs: opts.rejectAfterMs ?? DEFAULT_REJECT_AFTER_MS,
        idleTimeoutMs: opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS,
        newInitiator,
        onConfirmed: (s) => {
          if (settled) return;
          settled = true;
          clearTimeout(deadline);
          clearTimeout(retransmitTimer);
          log.debug('handshake complete', { remote: serverAddress, attempts });
          resolve(s);
        },
        onGone: () => {
          receiver.close();
          endpoint.close();
        },
        bytesIn,
        bytesOut,
      });
      // Confirm at once; the retransmission schedule continues with CONFIRMs.
      clearTimeout(retransmitTimer);
      delay = RETRANSMIT_START_MS;
      transmit();
    };

    endpoint.start({
      datagram: onDatagram,
      drain() {
        session?.onDrain();
      },
      close(err) {
        receiver.close();
        if (settled) {
          session?.onEndpointClose(err);
          return;
        }
        fail(new DshieldError(ErrorCodes.HANDSHAKE_TIMEOUT, `the UDP socket closed before the server answered the handshake: ${errorText(err ?? 'closed')}`, { cause: err }));
      },
    });
    transmit();
  });
}

// ---------------------------------------------------------------------------
// Server

export interface DatagramAcceptOptions extends Omit<ServerAcceptOptions, 'onRefused'> {
  /**
   * For logging, rate-limited (at most 10 a second): an initiation was not
   * answered. Reasons as ServerAcceptOptions.onRefused, plus 'too many
   * handshakes' (rate limit) and 'refused: too many pending handshakes'.
   * Datagrams that are not even shaped like an initiation are not reported.
   */
  onRefused(reason: string, remote: string): void;
  /** Close a session after this long without an authenticated record (default 180_000). */
  idleTimeoutMs?: number;
  /** Answered handshakes waiting for the client's first record, in total (default 1024). */
  maxHalfOpen?: number;
  /** Initiations examined per second, all sources together (default 1000); each costs a DH. */
  handshakesPerSecond?: number;
  /** Initiations examined per second from one source IP (default 20), in bursts of up to twice that. */
  handshakesPerSource?: number;
  /** Warn (log.warn, with counts since the last warning) at most this often when the rate limits turn initiations away (default 60_000). */
  rateLimitWarningMs?: number;
}

/** The server side of an endpoint. close() stops answering initiations; the endpoint closes once no session is left. */
export interface DatagramAcceptor extends TransportListener {
  /** Sessions announced through onSession and not closed yet. */
  readonly sessions: number;
  /** Handshakes answered and not yet confirmed. */
  readonly halfOpen: number;
}

/** A token bucket: `rate` a second, holding up to `burst`. */
class Bucket {
  private tokens: number;
  private at = Date.now();
  constructor(
    private readonly rate: number,
    private readonly burst: number,
  ) {
    this.tokens = burst;
  }
  take(now: number): boolean {
    this.tokens = Math.min(this.burst, this.tokens + ((now - this.at) * this.rate) / 1000);
    this.at = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}

/** The IP of "ip:port" / "[ipv6]:port". */
function sourceIp(from: string): string {
  return from.startsWith('[') ? from.slice(1, from.indexOf(']')) : from.slice(0, from.lastIndexOf(':'));
}

/**
 * Serve dshield sessions on `endpoint` (fresh, not started): answer
 * authentic initiations, announce each session through opts.onSession once
 * the client confirmed it, route records by receiver index, follow roaming
 * clients, and stay silent to everything else. Never throws from the network.
 */
export function acceptDatagramSessions(endpoint: DatagramEndpoint, opts: DatagramAcceptOptions): DatagramAcceptor {
  const ctx: ResponderContext = { cipher: opts.cipher, hash: opts.hash, staticKey: opts.staticKey, auth: opts.auth, replay: opts.replay };
  const log = opts.log;
  const indices = new IndexTable();
  const onDatagram = (data: Buffer, from: string): void => {
    if (data.length === 0) return;
    receiver.noteDatagram();
    const type = data[0];
    if (type === MSG_DATA) {
      indices.deliverData(data, from);
    } else if (type === MSG_INITIATION) {
      try {
        onInitiation(data, from);
      } catch (err) {
        // A bug (here or in a plugin) must not crash the server or reveal anything to the peer.
        refuse(`internal error: ${errorText(err)}`, from);
      }
    }
  };
  const receiver = new PacketThreadSlot(endpoint, indices, onDatagram, log);
  // A roster, not a Set: every session passes through (see core/roster.ts).
  const sessions = new Roster<DatagramSession>();
  /** Half-open sessions, per client key (base64) and in total. */
  const halfOpen = new Map<string, DatagramSession[]>();
  let halfOpenCount = 0;
  const maxHalfOpen = opts.maxHalfOpen ?? DEFAULT_MAX_HALF_OPEN;
  const handshakesPerSecond = opts.handshakesPerSecond ?? DEFAULT_HANDSHAKES_PER_SECOND;
  const allHandshakes = new Bucket(handshakesPerSecond, handshakesPerSecond);
  const handshakesPerSource = opts.handshakesPerSource ?? DEFAULT_HANDSHAKES_PER_SOURCE;
  const perSource = new Map<string, Bucket>();
  const reports = new Bucket(REFUSALS_REPORTED_PER_SECOND, REFUSALS_REPORTED_PER_SECOND);
  let unreported = 0;
  let accepting = true;
  let endpointClosed = false;
  let closed: Promise<void> | undefined;

  const refuse = (reason: string, remote: string): void => {
    if (!reports.take(Date.now())) {
      unreported++;
      return;
    }
    log.debug('handshake refused', { remote, reason, ...(unreported > 0 ? { notReported: unreported } : {}) });
    unreported = 0;
    try {
      opts.onRefused(reason, remote);
    } catch (err) {
      log.error('onRefused threw', { error: errorText(err) });
    }
  };

  const maybeCloseEndpoint = (): void => {
    if (!accepting && sessions.size === 0 && halfOpenCount === 0 && !endpointClosed) {
      endpointClosed = true;
      receiver.close();
      endpoint.close();
    }
  };

  const forgetHalfOpen = (session: DatagramSession, clientKey: string): void => {
    const list = halfOpen.get(clientKey);
    if (list === undefined) return;
    const at = list.indexOf(session);
    if (at < 0) return;
    list.splice(at, 1);
    halfOpenCount--;
    if (list.length === 0) halfOpen.delete(clientKey);
  };

  /** Which limit, if any, turns this initiation away: the source IP's or the overall one. */
  const rateLimited = (ip: string, now: number): 'source' | 'overall' | null => {
    let bucket = perSource.get(ip);
    if (bucket === undefined) {
      if (perSource.size >= MAX_TRACKED_SOURCES) perSource.clear();
      bucket = new Bucket(handshakesPerSource, 2 * handshakesPerSource);
      perSource.set(ip, bucket);
    }
    if (!bucket.take(now)) return 'source';
    return allHandshakes.take(now) ? null : 'overall';
  };

  // Turned away by the limits since the last warning. Refusals are logged at debug only, so an
  // operator whose own clients hit the limits learns it from this warning, and which setting to raise.
  const limited = { source: 0, overall: 0, latestSource: '', since: 0 };
  let lastLimitWarning = -Infinity;
  const rateLimitWarningMs = opts.rateLimitWarningMs ?? RATE_LIMIT_WARNING_MS;
  const noteLimited = (limit: 'source' | 'overall', ip: string, now: number): void => {
    if (limited.source + limited.overall === 0) limited.since = now;
    limited[limit]++;
    if (limit === 'source') limited.latestSource = ip;
    if (now - lastLimitWarning < rateLimitWarningMs) return;
    lastLimitWarning = now;
    const parts: string[] = [];
    if (limited.source > 0) {
      parts.push(`${limited.source} over server.handshakesPerSource (${handshakesPerSource} a second from one IP, latest ${limited.latestSource})`);
    }
    if (limited.overall > 0) parts.push(`${limited.overall} over server.handshakesPerSecond (${handshakesPerSecond} a second in all)`);
    const total = limited.source + limited.overall;
    const what = total === 1 ? 'an initiation' : `${total} initiations in ${Math.max(1, Math.round((now - limited.since) / 1000))} s`;
    log.warn(`handshake rate limits turned away ${what}: ${parts.join('; ')}. Their clients retry; if they are yours (many behind one NAT, or all reconnecting at once), raise the setting`, {
      bySource: limited.source,
      overall: limited.overall,
    });
    limited.source = 0;
    limited.overall = 0;
  };

  const onInitiation = (data: Buffer, from: string): void => {
    if (!accepting || data.length < MIN_INITIATION) return;
    const ip = sourceIp(from);
    const now = Date.now();
    const limit = rateLimited(ip, now);
    if (limit !== null) {
      noteLimited(limit, ip, now);
      refuse('too many handshakes', from);
      return;
    }
    const clientIndex = data.readUInt32LE(1);
    const init = checkInitiation(ctx, Buffer.from(data.subarray(5)));
    if (!init.ok) {
      refuse(init.reason, from);
      return;
    }
    const clientKey = init.clientKey;
    const keyText = clientKey.toString('base64');
    if (halfOpenCount >= maxHalfOpen) {
      refuse('refused: too many pending handshakes', from);
      return;
    }
    let message2: Buffer;
    try {
      message2 = init.state.writeMessage(jsonBytes(opts.respond(init.identity, init.json)));
    } catch (err) {
      refuse(`refused: ${errorText(err)}`, from);
      return;
    }
    if (9 + message2.length > endpoint.maxDatagramSize) {
      refuse('refused: the response parameters do not fit in one datagram', from);
      return;
    }
    // A client that retransmits has several answered handshakes; it uses one, the rest expire.
    const mine = halfOpen.get(keyText) ?? [];
    if (mine.length >= HALF_OPEN_PER_CLIENT) mine[0]!.discard();
    const localIndex = indices.reserve();
    let listed: RosterTicket<DatagramSession> | undefined;
    const session: DatagramSession = new DatagramSession({
      side: 'server',
      endpoint,
      indices,
      receiver,
      peerAddress: from,
      keypair: keypairFrom(init.state.split(), localIndex, clientIndex),
      peer: init.identity,
      params: init.json,
      log,
      rekeyAfterMs: opts.rekeyAfterMs ?? DEFAULT_REKEY_AFTER_MS,
      rejectAfterMs: opts.rejectAfterMs ?? DEFAULT_REJECT_AFTER_MS,
      // Until confirmed, the idle timeout is the handshake timeout: an unused answer is forgotten.
      idleTimeoutMs: opts.idleTimeoutMs ?? DEFAULT_IDLE_TIMEOUT_MS,
      answerRekey: (message1) => {
        const again = checkInitiation(ctx, message1, clientKey);
        if (!again.ok) {
          log.debug('rekey refused', { client: init.identity.name, reason: again.reason });
          return null;
        }
        return { message2: again.state.writeMessage(jsonBytes({})), keys: again.state.split() };
      },
      onConfirmed: (s) => {
        forgetHalfOpen(s, keyText);
        clearTimeout(expiry);
        listed = sessions.add(s);
        log.debug('handshake complete', { remote: s.remoteAddress, client: init.identity.name, pattern: init.state.pattern });
        try {
          opts.onSession(s);
        } catch (err) {
          // Nobody owns the session: it must not linger.
          log.error('session setup failed', { error: errorText(err) });
          s.destroy(err instanceof Error ? err : new Error(String(err)));
        }
      },
      onGone: (s) => {
        clearTimeout(expiry);
        forgetHalfOpen(s, keyText);
        if (listed) sessions.remove(listed);
        maybeCloseEndpoint();
      },
      bytesIn: data.length,
      bytesOut: 9 + message2.length,
    });
    mine.push(session);
    halfOpen.set(keyText, mine);
    halfOpenCount++;
    const expiry = setTimeout(() => {
      if (!session.confirmed) session.discard();
    }, opts.handshakeTimeoutMs);
    expiry.unref();
    const response = Buffer.allocUnsafe(9 + message2.length);
    response[0] = MSG_RESPONSE;
    response.writeUInt32LE(localIndex, 1);
    response.writeUInt32LE(clientIndex, 5);
    message2.copy(response, 9);
    endpoint.send(response, from);
  };

  endpoint.start({
    datagram: onDatagram,
    drain() {
      for (const s of sessions.values()) if (s.wantsDrain) s.onDrain();
    },
    close(err) {
      endpointClosed = true;
      accepting = false;
      receiver.close();
      for (const list of [...halfOpen.values()]) for (const s of [...list]) s.discard();
      for (const s of sessions.values()) s.onEndpointClose(err);
    },
  });

  return {
    address: endpoint.localAddress,
    get sessions() {
      return sessions.size;
    },
    get halfOpen() {
      return halfOpenCount;
    },
    close() {
      closed ??= new Promise<void>((resolve) => {
        accepting = false;
        for (const list of [...halfOpen.values()]) for (const s of [...list]) s.discard();
        maybeCloseEndpoint();
        setImmediate(resolve);
      });
      return closed;
    },
  };
}
