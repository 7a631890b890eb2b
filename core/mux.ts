/**
 * The mux: many flow-controlled streams, UDP datagrams, IP packets (TUN
 * mode) and pings inside the payloads of one secure session.
 *
 * The owner (client.ts / server.ts) gives the mux a `send(payload)` function,
 * where one payload becomes one encrypted record, and feeds it every payload
 * the session decrypts. The mux knows nothing about crypto or transports.
 *
 * Wire format (dshield/1 mux)
 * ---------------------------
 *   Payload := Frame+             a frame never spans two payloads
 *   Frame   := type u8 | id u32 BE | length u16 BE | body[length]
 *
 *   type  name       id         body                                direction
 *   0x01  OPEN       stream     Address                             client -> server
 *   0x02  OPEN_OK    stream     (empty)                             server -> client
 *   0x03  OPEN_ERR   stream     code u8 | reason (ASCII, <= 64)     server -> client
 *   0x04  DATA       stream     1..16384 bytes of stream data       both
 *   0x05  WINDOW     stream     increment u32 BE (> 0)              both
 *   0x06  FIN        stream     (empty): no more DATA from sender   both
 *   0x07  RST        stream     (empty): stream gone, both ways     both
 *   0x08  UDP_OPEN   assoc      (empty)                             client -> server
 *   0x09  UDP_DATA   assoc      Address | datagram                  both (to / from)
 *   0x0a  UDP_CLOSE  assoc      (empty)                             both
 *   0x0b  PING       0          opaque u64                          both
 *   0x0c  PONG       0          the PING's opaque u64               both
 *   0x0d  PACKET     0          one IP packet (1..maxPacket bytes)  both
 *
 *   Address := 0x01 | IPv4 (4 bytes)                 | port u16 BE
 *            | 0x03 | len u8 (1..255) | domain ([A-Za-z0-9._-]) | port u16 BE
 *            | 0x04 | IPv6 (16 bytes)                | port u16 BE
 *
 *   OPEN_ERR codes: see WIRE_ERROR_CODES below (the ErrorCodes of core/errors.ts,
 *   append-only); 0 = unspecified. The reason is DshieldError.detail.reason
 *   ('refused' | 'unreachable' | 'dns' | 'timeout' for DESTINATION).
 *
 * PACKET frames carry TUN mode's IP packets. Like UDP_DATA they are
 * datagrams: no credit, no ordering promise beyond the transport's, dropped
 * (never queued without bound) when the session is congested. A packet longer
 * than `maxPacket` (the TUN MTU) is dropped on either side.
 *
 * Lossy mode (MuxOptions.lossy, for sessions over a datagram transport,
 * where a payload may be lost or arrive out of order): streams need every
 * byte in order, so openStream is refused locally (UNSUPPORTED) and a server
 * answers OPEN with RST. Datagrams and packets work as always. Because a
 * UDP_OPEN may be lost, the server takes a UDP_DATA for an unknown odd id as
 * an implicit open; because a UDP_CLOSE may be lost, the server forgets an
 * association idle for udpIdleMs (silently: the client's next datagram
 * opens it again). A PING is resent every second or so until its PONG
 * comes back or it times out.
 *
 * Early data: a client may send DATA (and FIN) on a stream right after its
 * OPEN, before OPEN_OK, within the protocol's window (openStream's `early`).
 * The server holds it, at most PROTOCOL_WINDOW bytes per stream, until it
 * accepts the stream (then the destination gets it) or refuses it (then it
 * is dropped). This saves the round trip to the server on a new connection
 * whose client speaks first (an HTTP request, a TLS ClientHello).
 *
 * Ids: only the client opens streams and UDP associations, with odd ids
 * counting up from 1 (streams and associations are separate id spaces).
 * Even ids are reserved for server-opened ones (unused in dshield/1).
 * Unknown frame types are skipped, so the format can grow.
 *
 * Flow control (per stream, per direction, like HTTP/2 and yamux): the sender
 * starts with PROTOCOL_WINDOW bytes of credit and sends DATA only within its
 * credit. The receiver grants more with WINDOW as its consumer reads, in
 * batches of at least half its window, so at most `window` bytes are ever in
 * flight or buffered on its side. DATA beyond credit is a protocol violation:
 * the stream is reset. A sender with more data than credit does not spend
 * credit below CREDIT_SLIVER (1 KiB) on its own record; it waits for the next
 * WINDOW, which the receiver sends once its consumer reads, or at once when
 * its consumer waits and the peer holds less than CREDIT_SLIVER.
 *
 * Sending: frames are packed into payloads (control frames first, then
 * datagrams, then DATA round-robin across streams, one frame of <= 16 KiB per
 * stream per turn) at the end of the current microtask, so frames written in
 * one tick share records and no frame waits for more; only the sliver left
 * of a write that filled a payload waits, for the end of the event-loop
 * turn, so the next socket read can join it (onlyTailsWait). Queued packets
 * go sooner, once they fill several payloads (PACKET_FLUSH_PAYLOADS): a TUN
 * device hands over a whole batch in one synchronous run. When `send` returns
 * false nothing more is sent, and the streams' write callbacks are held,
 * until `drain()`.
 */
import { Duplex } from 'node:stream';
import { isIPv4, isIPv6 } from 'node:net';
import { DshieldError, ErrorCodes, isDshieldError, type ErrorCode } from './errors.ts';
import type { EventBus } from './events.ts';
import { watchAbort } from './abort-watch.ts';
import { countView, vouchRecord } from './record-memory.ts';
import type { Logger, Target, TunnelUdp } from './types.ts';
import { u16be } from './bytes.ts';

// ---------------------------------------------------------------------------
// Public API

/** What a mux needs of the session it sends through (core/session.ts Session). */
export interface PayloadSink {
  send(payload: Buffer): boolean;
  payloadBuffer?(): Buffer;
  sendInPlace?(payload: Buffer): boolean;
}

/** MuxOptions.send and .payloadBuffer for a session: sealing in place (no copies) when it can. */
export function sendThrough(sink: PayloadSink): Pick<MuxOptions, 'send' | 'payloadBuffer'> {
  // Methods, not arrow properties: tsx names each arrow property, a defineProperty per session.
  if (sink.sendInPlace !== undefined && sink.payloadBuffer !== undefined) {
    return {
      send(payload) {
        return sink.sendInPlace!(payload);
      },
      payloadBuffer() {
        return sink.payloadBuffer!();
      },
    };
  }
  return {
    send(payload) {
      return sink.send(payload);
    },
  };
}

export interface MuxOptions {
  side: 'client' | 'server';
  /**
   * Send one payload as one record. Returns false when the mux should stop
   * sending until `mux.drain()` is called. Never larger than maxPayload.
   * The mux never writes into a payload after passing it: the session may keep it.
   */
  send(payload: Buffer): boolean;
  /**
   * Memory to assemble the next payload in (at least maxPayload bytes), for
   * a session that seals in place (Session.payloadBuffer). When given, every
   * payload passed to `send` is a prefix of the buffer it last returned. By
   * default payloads are cut from a slab shared by the process's muxes.
   */
  payloadBuffer?(): Buffer;
  /** The largest payload `send` takes (e.g. 65518). At least 512. */
  maxPayload: number;
  log: Logger;
  /** If given, 'stream:open' / 'stream:close' are emitted on it. */
  events?: EventBus;
  /** The client's name, for events and logs on the server. */
  client?: string;
  /** Per-stream receive window in bytes, default 256 KiB (at least 32 KiB). */
  initialWindow?: number;
  /**
   * How far a fast stream's receive window may grow (see MAX_STREAM_WINDOW,
   * the default); initialWindow or less keeps every window as it started.
   */
  maxWindow?: number;
  /** server: a client asks to open a stream to target. */
  onOpen?(req: OpenRequest): void;
  /** server: a client started a UDP association. */
  onUdp?(assoc: UdpAssociation): void;
  /**
   * An IP packet from the peer (PACKET frame, TUN mode). The buffer is valid
   * only during the call: copy what must outlive it. Without a handler
   * packets are dropped.
   */
  onPacket?(packet: Buffer): void;
  /** The largest IP packet sent or accepted (the TUN MTU); default: what fits in one payload. */
  maxPacket?: number;
  /** Max concurrent streams (default 65536). A peer going over is refused with RST. */
  maxStreams?: number;
  /** Max UDP associations (default 256). A peer going over is refused with UDP_CLOSE. */
  maxUdp?: number;
  /** Payloads may be lost, duplicated or reordered (a datagram session): see "Lossy mode" above. */
  lossy?: boolean;
  /** Lossy mode, server: forget a UDP association after this long without a datagram (default 120_000). */
  udpIdleMs?: number;
}

export interface OpenRequest {
  readonly id: number;
  readonly target: Target;
  /** Aborted when the client gives up on this open (RST) or the mux closes before accept/reject. */
  readonly signal: AbortSignal;
  /**
   * Confirm the open; returns the stream (a Duplex, allowHalfOpen) to pipe with
   * the destination socket. If the client already gave up, the stream returned
   * is already destroyed (without an error event). Later calls return the same stream.
   */
  accept(): Duplex;
  /**
   * Refuse the open; the client's openStream rejects with an equivalent
   * DshieldError (same code and detail.reason). Node errno errors
   * (ECONNREFUSED, ENOTFOUND, ETIMEDOUT, EHOSTUNREACH...) map to DESTINATION
   * with the matching reason. No-op after accept().
   */
  reject(err: unknown): void;
}

export interface UdpAssociation {
  readonly id: number;
  /** server -> client: a datagram that came from `from`. Dropped if the association is closed or the queue is full. */
  send(from: Target, payload: Buffer): void;
  /** client -> server datagrams: `to` is the destination. The payload is the handler's to keep. */
  onMessage(handler: (to: Target, payload: Buffer) => void): void;
  /** Called once when the association ends, whichever side (or the mux) ended it. */
  onClose(handler: () => void): void;
  close(): void;
}

/** The client's side of a UDP association: TunnelUdp plus its id and close notice. */
export interface MuxUdp extends TunnelUdp {
  readonly id: number;
  /** Called once when the association ends (closed here, refused or closed by the server, or the mux closed). */
  onClose(handler: () => void): void;
}

/** Each direction of each stream starts with this much credit (fixed by the protocol). */
export const PROTOCOL_WINDOW = 256 * 1024;
/** The most stream data one DATA frame carries. */
export const MAX_DATA = 16 * 1024;
/** type u8 | id u32 | length u16. */
export const FRAME_HEADER = 7;
/**
 * Credit below this is a sliver: a sender with more data than that waits for
 * the next WINDOW instead of spending it on a tiny record, and a receiver
 * whose consumer waits treats a peer holding only a sliver as out of credit.
 */
export const CREDIT_SLIVER = 1024;

export const FrameType = {
  OPEN: 0x01,
  OPEN_OK: 0x02,
  OPEN_ERR: 0x03,
  DATA: 0x04,
  WINDOW: 0x05,
  FIN: 0x06,
  RST: 0x07,
  UDP_OPEN: 0x08,
  UDP_DATA: 0x09,
  UDP_CLOSE: 0x0a,
  PING: 0x0b,
  PONG: 0x0c,
  PACKET: 0x0d,
} as const;

/**
 * OPEN_ERR code byte n (n >= 1) is WIRE_ERROR_CODES[n - 1]. Append only: the
 * position is the wire value.
 */
export const WIRE_ERROR_CODES: readonly ErrorCode[] = [
  ErrorCodes.EGRESS_DENIED,
  ErrorCodes.DESTINATION,
  ErrorCodes.STREAM_RESET,
  ErrorCodes.TUNNEL_DOWN,
  ErrorCodes.UNSUPPORTED,
  ErrorCodes.PROTOCOL,
  ErrorCodes.INTERNAL,
  ErrorCodes.CONFIG,
  ErrorCodes.PLUGIN,
  ErrorCodes.KEY,
  ErrorCodes.USAGE,
  ErrorCodes.LISTEN,
  ErrorCodes.UNREACHABLE,
  ErrorCodes.SERVER_KEY_MISMATCH,
  ErrorCodes.HANDSHAKE_TIMEOUT,
  ErrorCodes.INVITE,
  ErrorCodes.TUN,
];

const DEFAULT_WINDOW = PROTOCOL_WINDOW;
/**
 * The receive window the client and server give each stream. The credit
 * round trip runs through both event loops, so when they are busy a small
 * window idles the stream: in local mode a 256 KiB window carried ~70 MB/s
 * and 2 MiB ~110 MB/s. Credit is a promise, not an allocation: an idle
 * stream costs nothing for it.
 */
export const STREAM_WINDOW = 2 * 1024 * 1024;
/**
 * A fast stream's window doubles, up to this, so that it holds at least
 * FAST_HALF_WINDOW_MS x 2 of the stream's rate: a grant that comes less
 * than FAST_HALF_WINDOW_MS after the one before, with our consumer keeping
 * up, doubles it. The credit round trip runs through both processes' event
 * loops, and on a busy machine each waits to be scheduled: a 1 GiB SOCKS5
 * download on this 2-core machine left ~22 % of it idle with 2 MiB windows
 * and ~15 % with 8 MiB (measured). A stream slower than half a window per
 * FAST_HALF_WINDOW_MS keeps the window it started with.
 */
export const MAX_STREAM_WINDOW = 16 * 1024 * 1024;
const FAST_HALF_WINDOW_MS = 16;
/**
 * How much all of one mux's streams may grow their windows together, so a
 * session with many fast streams cannot promise more than this on top of
 * their initial windows. Credit is a promise; what a stream can hold
 * unread is its window.
 */
export const WINDOW_GROWTH_BUDGET = 64 * 1024 * 1024;
const MIN_WINDOW = 32 * 1024;
const MAX_WINDOW = 2 ** 30;
const MIN_PAYLOAD = 512;
const WRITABLE_HWM = 64 * 1024;
const DEFAULT_PING_TIMEOUT_MS = 10_000;
/** Lossy mode: a server-side UDP association with no datagram for this long is forgotten. */
const DEFAULT_UDP_IDLE_MS = 120_000;
/** Lossy mode: client-closed association ids remembered so late datagrams do not reopen them. */
const MAX_CLOSED_UDP_IDS = 1024;
const MAX_REASON = 64;
/** Replies the peer provoked (PONG, refusals) waiting while congested; beyond this they are dropped. */
const MAX_REPLIES = 1024;
/** Datagram bytes waiting while congested; beyond this datagrams are dropped, as UDP allows. */
const MAX_DGRAM_QUEUE = 256 * 1024;
/** IP packet bytes waiting while congested (TUN mode); beyond this packets are dropped, as IP allows. */
const MAX_PACKET_QUEUE = 256 * 1024;
/**
 * Packets queued in one turn are sent at once when they fill this many
 * payloads (or half of MAX_PACKET_QUEUE): enough that they still share
 * records, never so many that a burst overruns the queue.
 */
const PACKET_FLUSH_PAYLOADS = 8;
const U32_MAX = 0xffffffff;

// Per-stream control frames waiting to go out (bits of MuxStream.ctl), in wire order.
const C_OPEN = 1;
const C_OPEN_OK = 2;
const C_OPEN_ERR = 4;
const C_WINDOW = 8;
const C_FIN = 16;
const C_RST = 32;

/**
 * Stream lifecycle. client: opening -> open -> closed. server: pending (onOpen
 * called, waiting for accept/reject) -> open -> closed. "closed" is the
 * protocol state (both FINs, or a RST either way, or refused); the Duplex may
 * still hold data its consumer has not read.
 */
type StreamState = 'opening' | 'pending' | 'open' | 'closed';

type WriteCallback = (err?: Error | null) => void;

/** What a MuxStream calls back into its mux (kept off the Mux's public surface). */
interface StreamHost {
  read(s: MuxStream): void;
  write(s: MuxStream, chunks: Buffer[], bytes: number, cb: WriteCallback): void;
  final(s: MuxStream): void;
  destroyed(s: MuxStream, err: Error | null): void;
}

class MuxStream extends Duplex {
  state: StreamState;
  /** Set once the stream reached 'open' (events are emitted only for those). */
  opened = false;
  ctl = 0;
  /** Credit we have to send DATA. */
  sendCredit = PROTOCOL_WINDOW;
  /** Credit the peer has (as far as we granted it) to send us DATA. */
  recvCredit = PROTOCOL_WINDOW;
  /** WINDOW increment waiting to go out (grants coalesce). */
  grant = 0;
  /** When the last grant was made (performance.now()); -Infinity before the first. */
  grantedAt = -Infinity;
  finSent = false;
  finRecv = false;
  /** Outgoing data held until framed: the chunks of the current _write/_writev. */
  out: Buffer[] = NO_CHUNKS;
  outIndex = 0;
  outOffset = 0;
  outBytes = 0;
  outCb: WriteCallback | null = null;
  /** _final came while a carried tail was still unsent: FIN follows it. */
  finAfterData = false;
  bytesIn = 0;
  bytesOut = 0;
  /** OPEN body (client) or OPEN_ERR body (server), encoded once. */
  ctlBody: Buffer | null = null;
  /** client: the pending openStream promise, or for an early stream what ends its opening. */
  settle: ((err: Error | null) => void) | null = null;
  /** client: handed out before OPEN_OK (openStream's `early`): it may send DATA and FIN while opening. */
  early = false;
  /** server: for OpenRequest.signal, created on first use. */
  abort: AbortController | null = null;

  constructor(
    private readonly host: StreamHost,
    readonly id: number,
    readonly target: Target,
    readonly targetText: string,
    /** Our receive window (grows, see MAX_STREAM_WINDOW). */
    public window: number,
    state: StreamState,
  ) {
    // readableHighWaterMark = window / 2: Node calls _read (which checks for a
    // grant) once a read leaves less than that buffered, i.e. with at least
    // half the window free, which is when a batched grant is due. A grown
    // window keeps this mark: a stream only grows while its reader keeps up.
    super({ allowHalfOpen: true, readableHighWaterMark: window >>> 1, writableHighWaterMark: WRITABLE_HWM });
    this.state = state;
  }

  override _read(): void {
    this.host.read(this);
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, cb: WriteCallback): void {
    this.host.write(this, [chunk], chunk.length, cb);
  }

  override _writev(chunks: Array<{ chunk: Buffer; encoding: BufferEncoding }>, cb: WriteCallback): void {
    const list = new Array<Buffer>(chunks.length);
    let bytes = 0;
    for (let i = 0; i < chunks.length; i++) {
      list[i] = chunks[i].chunk;
      bytes += chunks[i].chunk.length;
    }
    this.host.write(this, list, bytes, cb);
  }

  override _final(cb: WriteCallback): void {
    this.host.final(this);
    cb();
  }

  override _destroy(err: Error | null, cb: WriteCallback): void {
    this.host.destroyed(this, err);
    cb(err);
  }
}

const NO_CHUNKS: Buffer[] = [];

/** What an Assoc calls back into its mux. */
interface UdpHost {
  send(a: Assoc, target: Target, payload: Buffer): void;
  close(a: Assoc): void;
  /** Runs an owner's handler; a throw is logged, not propagated. */
  safely(what: string, fn: () => void): void;
}

/** A UDP association, either side. */
class Assoc implements UdpAssociation, MuxUdp {
  closed = false;
  /** Date.now() of the last datagram either way (lossy mode's idle timeout). */
  lastActive = Date.now();
  private messageHandler: ((target: Target, payload: Buffer) => void) | null = null;
  private closeHandlers: Array<() => void> = [];

  constructor(
    readonly id: number,
    private readonly host: UdpHost,
  ) {}

  /** The payload is referenced until it is framed (within this tick unless congested): do not modify it. */
  send(target: Target, payload: Buffer): void {
    if (!this.closed) this.host.send(this, target, payload);
  }
  onMessage(handler: (target: Target, payload: Buffer) => void): void {
    this.messageHandler = handler;
  }
  onClose(handler: () => void): void {
    if (this.closed) queueMicrotask(() => this.host.safely('udp close handler', handler));
    else this.closeHandlers.push(handler);
  }
  close(): void {
    if (!this.closed) this.host.close(this);
  }
  /** Mux side: deliver a datagram from the peer. */
  deliver(target: Target, payload: Buffer): void {
    this.messageHandler?.(target, payload);
  }
  /** Mux side: mark closed and tell the listeners once. */
  ended(): void {
    if (this.closed) return;
    this.closed = true;
    const handlers = this.closeHandlers;
    this.closeHandlers = [];
    for (const h of handlers) this.host.safely('udp close handler', h);
  }
}

interface QueuedDatagram {
  id: number;
  address: Buffer;
  payload: Buffer;
}

interface PendingPing {
  started: number;
  timer: NodeJS.Timeout;
  /** Lossy mode: resends the PING until answered. */
  resend?: NodeJS.Timeout;
  resolve(rtt: number): void;
  reject(err: Error): void;
}

/** A FIFO with O(1) shift that keeps no references to shifted items. */
class Fifo<T> {
  private items: Array<T | undefined> = [];
  private head = 0;
  get size(): number {
    return this.items.length - this.head;
  }
  push(item: T): void {
    this.items.push(item);
  }
  peek(): T {
    return this.items[this.head] as T;
  }
  shift(): T {
    const item = this.items[this.head] as T;
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head >= 1024 && this.head * 2 >= this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }
  drainAll(): T[] {
    const all = this.items.slice(this.head) as T[];
    this.items = [];
    this.head = 0;
    return all;
  }
}

export class Mux {
  private readonly opts: MuxOptions;
  private readonly log: Logger;
  private readonly window: number;
  private readonly maxWindow: number;
  private readonly maxStreams: number;
  private readonly maxUdp: number;
  private readonly lossy: boolean;
  /** Packets longer than this have a payload to themselves (lossy mode: one record per datagram); Infinity otherwise. */
  private readonly soloPacket: number;
  /** Queued packet bytes at which sendPacket flushes at once instead of at the end of the microtask. */
  private readonly packetFlushAt: number;
  private readonly udpIdleMs: number;
  /** Lossy mode, server: checks associations for idleness while there are any. */
  private udpSweep: NodeJS.Timeout | undefined;
  /** Lossy mode, server: ids the client closed, so a late UDP_DATA does not reopen them (bounded). */
  private readonly closedUdpIds = new Set<number>();
  private readonly maxPayload: number;
  private readonly minFragment: number;

  private readonly streams = new Map<number, MuxStream>();
  private readonly udps = new Map<number, Assoc>();
  /** Streams with control frames to send, in the order they were queued. */
  private readonly ctlStreams = new Set<MuxStream>();
  /** Streams with data and credit to send; iteration order is the round-robin. */
  private readonly ready = new Set<MuxStream>();
  /** Encoded control frames of our own (UDP_OPEN, UDP_CLOSE, PING). */
  private readonly ctlFrames = new Fifo<Buffer>();
  /** Encoded answers the peer provoked (PONG, refusals): bounded by MAX_REPLIES. */
  private readonly replies = new Fifo<Buffer>();
  private readonly dgrams = new Fifo<QueuedDatagram>();
  private dgramBytes = 0;
  /** IP packets to send (copies; each at most maxPacket). */
  private readonly packets = new Fifo<Buffer>();
  private packetBytes = 0;
  private readonly maxPacket: number;
  private readonly pings = new Map<number, PendingPing>();
  private readonly idleWaiters = new Set<() => void>();
  /** Streams whose consumer read: check for a grant once the read is over. */
  private readonly grantChecks = new Set<MuxStream>();
  private grantCheckScheduled = false;
  /** What the streams' windows have grown by in total, bounded by WINDOW_GROWTH_BUDGET. */
  private windowGrowth = 0;

  private active = 0;
  private nextStreamId = 1;
  private nextUdpId = 1;
  /**
   * Marks our pings, so a PONG that answers none of them is caught. It only has to differ
   * between muxes; records are authenticated already, so it needs no secrecy (and
   * randomBytes would cost ~5 µs per session).
   */
  private readonly pingTag = (Math.random() * 0x1_0000_0000) >>> 0;
  private nextPing = 0;

  private closed = false;
  private congested = false;
  private flushing = false;
  private flushScheduled = false;
  /** A flush at the end of this event-loop turn is set, for carried tails (see onlyTailsWait). */
  private tailsScheduled = false;
  /** That flush is running: tails go out now. */
  private tailsDue = false;
  private inSend = false;
  private drainedDuringSend = false;
  /** Write callbacks to call once the payload holding their last bytes was sent. */
  private done: WriteCallback[] = [];
  /** Streams whose FIN waited for a carried tail that has now gone out. */
  private finLater: MuxStream[] = [];

  /** The payload being assembled: slab[start..pos), at most up to limit. */
  private slab: Buffer = EMPTY;
  private pos = 0;
  private limit = 0;

  private _bytesIn = 0;
  private _bytesOut = 0;
  private _lastActivity = Date.now();

  constructor(opts: MuxOptions) {
    if (!Number.isInteger(opts.maxPayload) || opts.maxPayload < MIN_PAYLOAD) {
      throw new DshieldError(ErrorCodes.INTERNAL, `mux: maxPayload must be an integer >= ${MIN_PAYLOAD}, got ${opts.maxPayload}`);
    }
    this.opts = opts;
    this.log = opts.log;
    this.maxPayload = opts.maxPayload;
    this.window = Math.min(MAX_WINDOW, Math.max(MIN_WINDOW, Math.floor(opts.initialWindow ?? DEFAULT_WINDOW)));
    this.maxWindow = Math.min(MAX_WINDOW, Math.max(this.window, Math.floor(opts.maxWindow ?? MAX_STREAM_WINDOW)));
    this.maxStreams = Math.max(1, opts.maxStreams ?? 65536);
    this.maxUdp = Math.max(0, opts.maxUdp ?? 256);
    this.lossy = opts.lossy === true;
    this.udpIdleMs = Math.max(1, opts.udpIdleMs ?? DEFAULT_UDP_IDLE_MS);
    this.minFragment = Math.min(1024, (this.maxPayload - FRAME_HEADER) >>> 1);
    const fits = Math.min(0xffff, this.maxPayload - FRAME_HEADER);
    this.maxPacket = opts.maxPacket === undefined ? fits : Math.max(1, Math.min(fits, Math.floor(opts.maxPacket)));
    // Room left beside such a packet is less than a frame with the smallest IP packet (20 bytes).
    this.soloPacket = this.lossy ? this.maxPayload - 2 * FRAME_HEADER - 20 : Infinity;
    this.packetFlushAt = Math.min(MAX_PACKET_QUEUE / 2, PACKET_FLUSH_PAYLOADS * this.maxPayload);
    // Assigned here, not as arrow fields: tsx names every arrow field of every instance (a defineProperty each).
    this.grantTask = () => this.runGrantChecks();
    this.flushTask = () => this.runScheduledFlush();
    this.tailsTask = () => this.runTails();
  }

  /** The scheduled work, made once per mux so that scheduling it allocates nothing. */
  private readonly grantTask: () => void;
  private readonly flushTask: () => void;
  private readonly tailsTask: () => void;

  // Made when the first stream or association needs them: a session that carries only packets
  // (TUN) or ends at the handshake (a probe, a reconnect storm) is spared the closures.
  private hostMade: StreamHost | undefined;
  private udpHostMade: UdpHost | undefined;

  private get host(): StreamHost {
    return (this.hostMade ??= {
      read: (s) => this.checkGrantSoon(s),
      write: (s, chunks, bytes, cb) => this.streamWrite(s, chunks, bytes, cb),
      final: (s) => this.streamFinal(s),
      destroyed: (s, err) => this.streamDestroyed(s, err),
    });
  }

  private get udpHost(): UdpHost {
    return (this.udpHostMade ??= {
      send: (a, target, payload) => this.udpSend(a, target, payload),
      close: (a) => this.udpClose(a),
      safely: (what, fn) => this.safely(what, fn),
    });
  }

  /** Streams not yet closed (opening, waiting for accept, or open). */
  get activeStreams(): number {
    return this.active;
  }
  /** Stream and datagram payload bytes received. */
  get bytesIn(): number {
    return this._bytesIn;
  }
  /** Stream and datagram payload bytes sent. */
  get bytesOut(): number {
    return this._bytesOut;
  }
  /** Date.now() of the last payload sent or received. */
  get lastActivity(): number {
    return this._lastActivity;
  }
  /** True after close(). */
  get isClosed(): boolean {
    return this.closed;
  }
  /**
   * Bytes held in the streams' buffers (both directions: unsent writes, unread
   * data) plus queued datagrams. O(streams): for diagnostics and tests.
   */
  get bufferedAmount(): number {
    let n = this.dgramBytes + this.packetBytes;
    // A carried tail is no longer counted by writableLength.
    for (const s of this.streams.values()) n += s.writableLength + s.readableLength + (s.outCb ? 0 : s.outBytes);
    return n;
  }

  // -------------------------------------------------------------------------
  // Opening

  /**
   * client: open a stream to target. Resolves after the server accepted it.
   * Rejects with DshieldError: EGRESS_DENIED, DESTINATION (detail.reason),
   * STREAM_RESET (refused, limit, or invalid target), TUNNEL_DOWN (the mux closed).
   *
   * `early`: resolve as soon as the OPEN is queued, so that data written at
   * once travels right behind it (see "Early data" above). A refusal then
   * comes as the stream's 'error', with the same DshieldError; what was
   * written before it is lost. Checks made here (a closed mux, too many
   * streams, a bad target) still reject.
   */
  openStream(target: Target, signal?: AbortSignal, early = false): Promise<Duplex> {
    if (this.closed) return Promise.reject(tunnelDown('the tunnel closed before the stream could open'));
    if (this.lossy) {
      return Promise.reject(new DshieldError(ErrorCodes.UNSUPPORTED, 'streams (SOCKS5 CONNECT, HTTP proxy) need a stream transport: tcp or ws'));
    }
    if (this.opts.side !== 'client') {
      return Promise.reject(new DshieldError(ErrorCodes.UNSUPPORTED, 'only the client side of a mux opens streams'));
    }
    const text = formatTarget(target);
    if (signal?.aborted) return Promise.reject(abortError(signal, text));
    let address: Buffer;
    try {
      address = encodeAddress(target);
    } catch (err) {
      return Promise.reject(err);
    }
    if (this.streams.size >= this.maxStreams || this.nextStreamId > U32_MAX) {
      return Promise.reject(
        new DshieldError(ErrorCodes.STREAM_RESET, `too many streams on this tunnel to open ${text}`, {
          detail: { target: text },
        }),
      );
    }
    const id = this.nextStreamId;
    this.nextStreamId += 2;
    const s = new MuxStream(this.host, id, { host: target.host, port: target.port }, text, this.window, 'opening');
    s.ctlBody = address;
    this.streams.set(id, s);
    this.active++;
    this.queueCtl(s, C_OPEN);
    this.grantCredit(s); // a window above the protocol's goes out with OPEN
    // The runtime's signal, usually: watched without a listener per stream (see core/abort-watch.ts).
    const unwatch = signal ? watchAbort(signal, () => this.abortOpen(s, abortError(signal, text))) : undefined;
    if (early) {
      s.early = true;
      s.settle = (err) => {
        s.settle = null;
        unwatch?.();
        if (err) s.destroy(err); // handed out already: its owner hears it as the stream's error
      };
      return Promise.resolve(s);
    }
    return new Promise<Duplex>((resolve, reject) => {
      s.settle = (err) => {
        s.settle = null;
        unwatch?.();
        if (err) reject(err);
        else resolve(s);
      };
    });
  }

  /** client: start a UDP association. Datagrams may be sent at once. */
  openUdp(): MuxUdp {
    const id = this.nextUdpId;
    this.nextUdpId += 2;
    const assoc = new Assoc(id, this.udpHost);
    if (this.closed || this.opts.side !== 'client' || id > U32_MAX) {
      assoc.ended();
      return assoc;
    }
    this.udps.set(id, assoc);
    this.ctlFrames.push(encodeFrame(FrameType.UDP_OPEN, id));
    this.scheduleFlush();
    return assoc;
  }

  /**
   * Send one IP packet (TUN mode). It is copied before this returns. False
   * when it was dropped: the mux is closed, the packet is empty or longer than
   * maxPacket, or MAX_PACKET_QUEUE bytes already wait for a congested session.
   *
   * Packets wait for the flush at the end of the turn, so that those read
   * together share a payload, except when nothing waits before the packet
   * and nothing would share its payload: nothing else comes this turn
   * (`alone`: the TUN device read it by itself), or, over a datagram session
   * (lossy mode, a payload per datagram), the packet is too large to leave
   * room. Then it is framed straight into the session's memory and sent
   * within the call: a packet that comes alone (a ping, a request) does not
   * pay for the queue and the flush.
   */
  sendPacket(packet: Uint8Array, alone = false): boolean {
    const n = packet.length;
    if (this.closed || n === 0 || n > this.maxPacket) return false;
    if ((alone || n > this.soloPacket) && !this.flushScheduled && !this.flushing && !this.congested && this.opts.payloadBuffer !== undefined) {
      const memory = this.opts.payloadBuffer();
      writeHeader(memory, 0, FrameType.PACKET, 0, n);
      memory.set(packet, FRAME_HEADER);
      this._bytesOut += n;
      this.flushing = true;
      try {
        this.sendPayload(memory.subarray(0, FRAME_HEADER + n));
      } finally {
        this.flushing = false;
      }
      return true;
    }
    if (this.packetBytes + n > MAX_PACKET_QUEUE) return false;
    const copy = Buffer.allocUnsafe(n);
    copy.set(packet);
    this.packets.push(copy);
    this.packetBytes += n;
    // A TUN device hands over up to a thousand packets in one synchronous
    // batch: waiting for the end of the microtask, they would overrun the
    // queue and be dropped. Once the queue fills several payloads, they go now.
    if (this.packetBytes >= this.packetFlushAt && !this.flushing && !this.congested) {
      this.flush();
      return true;
    }
    this.scheduleFlush();
    return true;
  }

  /** Round trip time in ms through the peer's mux. Rejects with TUNNEL_DOWN on timeout or close. */
  ping(timeoutMs = DEFAULT_PING_TIMEOUT_MS): Promise<number> {
    if (this.closed) return Promise.reject(tunnelDown('the tunnel is closed'));
    const seq = this.nextPing;
    this.nextPing = (this.nextPing + 1) >>> 0;
    const frame = Buffer.allocUnsafe(FRAME_HEADER + 8);
    writeHeader(frame, 0, FrameType.PING, 0, 8);
    frame.writeUInt32BE(this.pingTag, FRAME_HEADER);
    frame.writeUInt32BE(seq, FRAME_HEADER + 4);
    return new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        clearInterval(pending.resend);
        this.pings.delete(seq);
        reject(tunnelDown(`no answer to a ping within ${timeoutMs} ms`));
      }, timeoutMs);
      const pending: PendingPing = { started: performance.now(), timer, resolve, reject };
      if (this.lossy) {
        // The PING or its PONG may be lost: send the same PING again (the RTT counts from the first).
        pending.resend = setInterval(() => {
          this.ctlFrames.push(frame);
          this.scheduleFlush();
        }, Math.max(100, Math.min(1000, timeoutMs / 4)));
      }
      this.pings.set(seq, pending);
      this.ctlFrames.push(frame);
      this.scheduleFlush();
    });
  }

  /** Resolves when no stream is active any more, or after timeoutMs, or on close(). */
  whenIdle(timeoutMs: number): Promise<void> {
    if (this.active === 0 || this.closed) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.idleWaiters.delete(done);
        resolve();
      };
      const timer = setTimeout(done, timeoutMs);
      this.idleWaiters.add(done);
    });
  }

  /**
   * Destroy every stream with err (a DshieldError is kept; anything else
   * becomes TUNNEL_DOWN with it as cause), reject pending opens with
   * TUNNEL_DOWN, end UDP associations, reject pending pings. Sends nothing.
   * Idempotent.
   */
  close(err?: Error): void {
    if (this.closed) return;
    this.closed = true;
    // Errors capture stack traces: made only when a stream or ping is there to take them.
    let reason: DshieldError | undefined;
    let openReason: DshieldError | undefined;
    if (this.streams.size > 0 || this.pings.size > 0) {
      reason = isDshieldError(err) ? err : tunnelDown(err ? `the tunnel closed: ${err.message}` : 'the tunnel closed', err);
      openReason = reason.code === ErrorCodes.TUNNEL_DOWN ? reason : tunnelDown(reason.message, reason);
    }
    const streams = [...this.streams.values()];
    this.streams.clear();
    this.ctlStreams.clear();
    this.ready.clear();
    for (const s of streams) {
      const state = s.state;
      this.finishStream(s, reason!.message);
      if (state === 'opening') {
        s.settle?.(openReason!);
        s.destroy();
      } else if (state === 'pending') {
        s.abort?.abort(openReason);
        s.destroy();
      } else if (!s.destroyed) {
        s.destroy(reason);
      }
    }
    const udps = [...this.udps.values()];
    this.udps.clear();
    for (const a of udps) a.ended();
    for (const p of this.pings.values()) {
      clearTimeout(p.timer);
      clearInterval(p.resend);
      p.reject(openReason!);
    }
    clearInterval(this.udpSweep);
    this.pings.clear();
    this.ctlFrames.drainAll();
    this.replies.drainAll();
    this.dgrams.drainAll();
    this.dgramBytes = 0;
    this.packets.drainAll();
    this.packetBytes = 0;
    const held = this.done;
    this.done = [];
    for (const cb of held) cb(reason);
    for (const w of [...this.idleWaiters]) w();
  }

  /** The session can take more. */
  drain(): void {
    if (this.closed) return;
    if (this.inSend) this.drainedDuringSend = true;
    this.congested = false;
    if (!this.flushing) this.flush();
  }

  // -------------------------------------------------------------------------
  // Receiving

  /**
   * A decrypted payload from the session. Never throws. The buffer becomes
   * the mux's: stream data may be handed to readers as views of it, so the
   * caller must not write into it afterwards.
   */
  receive(payload: Buffer): void {
    if (this.closed) return;
    this._lastActivity = Date.now();
    const end = payload.length;
    let off = 0;
    let bad = 0;
    let firstProblem: string | undefined;
    // Whether this payload's memory may be read into again once its DATA views are released
    // (core/record-memory.ts): only if every frame keeps nothing of it but those views.
    let keepsNothing = true;
    while (off < end) {
      if (end - off < FRAME_HEADER) {
        bad++;
        firstProblem ??= 'truncated frame header';
        break;
      }
      const type = payload[off];
      const id = payload.readUInt32BE(off + 1);
      const len = payload.readUInt16BE(off + 5);
      const body = off + FRAME_HEADER;
      if (body + len > end) {
        bad++;
        firstProblem ??= 'frame longer than its payload';
        break;
      }
      if (!keepsNoView(type)) keepsNothing = false;
      let problem: string | undefined;
      try {
        problem = this.handleFrame(type, id, payload, body, len);
      } catch (err) {
        // A handler of ours or the owner's (data, onOpen, onMessage) threw: keep going.
        this.log.error('mux: a frame handler threw', { type, id, error: errorText(err) });
      }
      if (problem !== undefined) {
        bad++;
        firstProblem ??= problem;
      }
      if (this.closed) return;
      off = body + len;
    }
    if (bad > 0) this.log.debug('mux: dropped malformed frames from the peer', { count: bad, first: firstProblem });
    if (keepsNothing) vouchRecord(payload);
  }

  /** Handles one frame; returns what was wrong with it, if anything. */
  private handleFrame(type: number, id: number, p: Buffer, body: number, len: number): string | undefined {
    switch (type) {
      case FrameType.DATA:
        return this.onData(id, p, body, len);
      case FrameType.WINDOW:
        return this.onWindow(id, p, body, len);
      case FrameType.OPEN:
        return this.onOpenFrame(id, p, body, len);
      case FrameType.OPEN_OK:
        return this.onOpenOk(id, len);
      case FrameType.OPEN_ERR:
        return this.onOpenErr(id, p, body, len);
      case FrameType.FIN:
        return this.onFin(id, len);
      case FrameType.RST:
        return this.onRst(id, len);
      case FrameType.UDP_OPEN:
        return this.onUdpOpen(id, len);
      case FrameType.UDP_DATA:
        return this.onUdpData(id, p, body, len);
      case FrameType.UDP_CLOSE:
        return this.onUdpClose(id, len);
      case FrameType.PING:
        return this.onPing(p, body, len);
      case FrameType.PONG:
        return this.onPong(p, body, len);
      case FrameType.PACKET:
        return this.onPacketFrame(id, p, body, len);
      default:
        return `unknown frame type ${type}`;
    }
  }

  private onData(id: number, p: Buffer, body: number, len: number): string | undefined {
    const s = this.streams.get(id);
    if (!s || s.state === 'closed') return undefined; // late data for a stream we reset: normal
    // Early data (server, pending): held in the stream, within the protocol's window, until accept or reject.
    if (s.state !== 'open' && s.state !== 'pending') return this.violation(s, 'DATA before the stream was open');
    if (s.finRecv) return this.violation(s, 'DATA after FIN');
    if (len > MAX_DATA) return this.violation(s, `DATA of ${len} bytes (max ${MAX_DATA})`);
    if (len > s.recvCredit) return this.violation(s, 'DATA beyond the flow-control window');
    if (len === 0) return undefined;
    s.recvCredit -= len;
    s.bytesIn += len;
    this._bytesIn += len;
    s.push(dataChunk(p, body, len)); // may run the consumer's 'data' handler synchronously
    // A pending stream is granted nothing more until accepted: it may yet be refused (see accept()).
    if (s.state === 'open') this.grantCredit(s);
    return undefined;
  }

  private onWindow(id: number, p: Buffer, body: number, len: number): string | undefined {
    const s = this.streams.get(id);
    if (!s || s.state === 'closed') return undefined;
    if (len !== 4) return this.violation(s, 'WINDOW body is not 4 bytes');
    const increment = p.readUInt32BE(body);
    if (s.sendCredit + increment > U32_MAX) return this.violation(s, 'WINDOW overflows the credit');
    s.sendCredit += increment;
    this.updateReady(s);
    return undefined;
  }

  private onOpenFrame(id: number, p: Buffer, body: number, len: number): string | undefined {
    if (this.opts.side !== 'server') return 'OPEN sent to the client';
    if ((id & 1) === 0) return 'OPEN with an even (server) id';
    if (this.lossy) {
      // A stream cannot work over a lossy session; the client's mux refuses before sending OPEN.
      this.reply(encodeFrame(FrameType.RST, id));
      return 'OPEN over a lossy session';
    }
    const existing = this.streams.get(id);
    if (existing) return this.violation(existing, 'OPEN for a stream id in use');
    const target = decodeAddress(p, body, body + len, true);
    if (!target) {
      this.reply(encodeFrame(FrameType.RST, id));
      return 'OPEN with a malformed address';
    }
    const onOpen = this.opts.onOpen;
    if (!onOpen || this.streams.size >= this.maxStreams) {
      this.log.debug('mux: refusing a stream', { id, reason: onOpen ? 'too many streams' : 'no open handler' });
      this.reply(encodeFrame(FrameType.RST, id));
      return undefined;
    }
    const text = formatTarget(target);
    const s = new MuxStream(this.host, id, target, text, this.window, 'pending');
    this.streams.set(id, s);
    this.active++;
    const req = this.openRequest(s);
    try {
      onOpen(req);
    } catch (err) {
      this.log.error('mux: onOpen threw; refusing the stream', { id, error: errorText(err) });
      req.reject(err);
    }
    return undefined;
  }

  private openRequest(s: MuxStream): OpenRequest {
    return {
      id: s.id,
      target: s.target,
      get signal(): AbortSignal {
        s.abort ??= new AbortController();
        if (s.state === 'closed' && !s.opened && !s.abort.signal.aborted) {
          s.abort.abort(streamReset(s, 'the client gave up on the stream'));
        }
        return s.abort.signal;
      },
      accept: (): Duplex => {
        if (s.state === 'pending' && !this.closed) {
          s.state = 'open';
          s.opened = true;
          this.queueCtl(s, C_OPEN_OK);
          // The window above the protocol's rides with OPEN_OK. Granted at OPEN it went out
          // in a record of its own while the destination was being dialed (one more write
          // and wake-up per stream), and promised buffering to a stream that may be refused.
          this.grantCredit(s);
          this.emitOpen(s);
        }
        return s;
      },
      reject: (err: unknown): void => {
        if (s.state !== 'pending' || this.closed) return;
        const { code, reason } = toWireError(err);
        s.ctlBody = encodeOpenError(code, reason);
        this.queueCtl(s, C_OPEN_ERR);
        this.finishStream(s, undefined);
        s.destroy();
      },
    };
  }

  private onOpenOk(id: number, len: number): string | undefined {
    const s = this.streams.get(id);
    if (!s || s.state === 'closed') return undefined;
    if (s.state !== 'opening') return this.violation(s, 'OPEN_OK for a stream that is not opening');
    if (len !== 0) return this.violation(s, 'OPEN_OK with a body');
    s.state = 'open';
    s.opened = true;
    this.emitOpen(s);
    s.settle?.(null);
    this.updateReady(s);
    return undefined;
  }

  private onOpenErr(id: number, p: Buffer, body: number, len: number): string | undefined {
    const s = this.streams.get(id);
    if (!s || s.state === 'closed') return undefined;
    if (s.state !== 'opening') return this.violation(s, 'OPEN_ERR for a stream that is not opening');
    if (len < 1 || len > 1 + MAX_REASON) return this.violation(s, 'OPEN_ERR body of a bad size');
    const wireCode = p[body];
    const reason = len > 1 ? asciiOrUndefined(p, body + 1, body + len) : undefined;
    const err = openError(wireCode, reason, s.targetText);
    this.finishStream(s, undefined);
    s.settle?.(err);
    s.destroy();
    return undefined;
  }

  private onFin(id: number, len: number): string | undefined {
    const s = this.streams.get(id);
    if (!s || s.state === 'closed') return undefined;
    if (s.state !== 'open' && s.state !== 'pending') return this.violation(s, 'FIN before the stream was open');
    if (len !== 0) return this.violation(s, 'FIN with a body');
    if (s.finRecv) return undefined;
    s.finRecv = true;
    s.push(null);
    if (s.finSent) this.finishStream(s, undefined);
    return undefined;
  }

  private onRst(id: number, len: number): string | undefined {
    const s = this.streams.get(id);
    if (!s || s.state === 'closed') return undefined;
    const state = s.state;
    const peer = this.opts.side === 'client' ? 'server' : 'client';
    const err = streamReset(s, `the ${peer} reset the stream to ${s.targetText}`);
    this.finishStream(s, err.message);
    if (state === 'opening') {
      s.settle?.(err);
      s.destroy();
    } else if (state === 'pending') {
      s.abort?.abort(err);
      s.destroy(); // not handed out yet: no 'error' event nobody listens to
    } else {
      s.destroy(err);
    }
    return len === 0 ? undefined : 'RST with a body';
  }

  private onUdpOpen(id: number, len: number): string | undefined {
    if (this.opts.side !== 'server') return 'UDP_OPEN sent to the client';
    if ((id & 1) === 0 || this.udps.has(id)) return 'UDP_OPEN with an even id or one in use';
    if (len !== 0) return 'UDP_OPEN with a body';
    if (!this.acceptUdp(id)) this.reply(encodeFrame(FrameType.UDP_CLOSE, id));
    return undefined;
  }

  /** server: a new association from the client (UDP_OPEN, or lossy mode's implicit open). False when refused. */
  private acceptUdp(id: number): Assoc | null {
    this.closedUdpIds.delete(id);
    const onUdp = this.opts.onUdp;
    if (!onUdp || this.udps.size >= this.maxUdp) {
      this.log.debug('mux: refusing a UDP association', { id, reason: onUdp ? 'too many associations' : 'no UDP handler' });
      return null;
    }
    const assoc = new Assoc(id, this.udpHost);
    this.udps.set(id, assoc);
    if (this.lossy && this.udpSweep === undefined) {
      this.udpSweep = setInterval(() => this.sweepIdleUdp(), Math.max(10, Math.min(30_000, this.udpIdleMs / 4)));
      this.udpSweep.unref();
    }
    try {
      onUdp(assoc);
    } catch (err) {
      this.log.error('mux: onUdp threw; closing the association', { id, error: errorText(err) });
      assoc.close();
    }
    return assoc;
  }

  /** Lossy mode, server: forget associations idle for udpIdleMs, without a word (a UDP_CLOSE could be lost anyway). */
  private sweepIdleUdp(): void {
    const now = Date.now();
    for (const [id, assoc] of this.udps) {
      if (now - assoc.lastActive < this.udpIdleMs) continue;
      this.log.debug('mux: a UDP association went idle', { id });
      this.udps.delete(id);
      assoc.ended();
    }
    if (this.udps.size === 0) {
      clearInterval(this.udpSweep);
      this.udpSweep = undefined;
    }
  }

  private onUdpData(id: number, p: Buffer, body: number, len: number): string | undefined {
    let assoc = this.udps.get(id) ?? null;
    if (!assoc) {
      // Lossy mode: the UDP_OPEN may have been lost, or the association went idle here.
      const implicit = this.lossy && this.opts.side === 'server' && (id & 1) === 1 && !this.closedUdpIds.has(id);
      if (!implicit || !decodeAddress(p, body, body + len, false)) return undefined;
      assoc = this.acceptUdp(id);
      if (!assoc || assoc.closed) return undefined;
    }
    assoc.lastActive = Date.now();
    const end = body + len;
    const target = decodeAddress(p, body, end, false);
    if (!target) return 'UDP_DATA with a malformed address';
    const start = body + addressLength(p, body);
    const n = end - start;
    this._bytesIn += n;
    const payload = Buffer.allocUnsafe(n);
    p.copy(payload, 0, start, end);
    assoc.deliver(target, payload);
    return undefined;
  }

  private onUdpClose(id: number, len: number): string | undefined {
    if (this.lossy && this.opts.side === 'server') {
      this.closedUdpIds.add(id);
      if (this.closedUdpIds.size > MAX_CLOSED_UDP_IDS) this.closedUdpIds.delete(this.closedUdpIds.values().next().value!);
    }
    const assoc = this.udps.get(id);
    if (!assoc) return undefined;
    this.udps.delete(id);
    assoc.ended();
    return len === 0 ? undefined : 'UDP_CLOSE with a body';
  }

  private onPing(p: Buffer, body: number, len: number): string | undefined {
    if (len !== 8) return 'PING body is not 8 bytes';
    const frame = Buffer.allocUnsafe(FRAME_HEADER + 8);
    writeHeader(frame, 0, FrameType.PONG, 0, 8);
    p.copy(frame, FRAME_HEADER, body, body + 8);
    this.reply(frame);
    return undefined;
  }

  private onPong(p: Buffer, body: number, len: number): string | undefined {
    if (len !== 8) return 'PONG body is not 8 bytes';
    if (p.readUInt32BE(body) !== this.pingTag) return 'PONG for a ping we did not send';
    const seq = p.readUInt32BE(body + 4);
    const pending = this.pings.get(seq);
    if (!pending) return undefined; // timed out already
    this.pings.delete(seq);
    clearTimeout(pending.timer);
    clearInterval(pending.resend);
    pending.resolve(performance.now() - pending.started);
    return undefined;
  }

  private onPacketFrame(id: number, p: Buffer, body: number, len: number): string | undefined {
    if (id !== 0) return 'PACKET with a non-zero id';
    if (len === 0) return 'empty PACKET';
    if (len > this.maxPacket) return `PACKET of ${len} bytes (max ${this.maxPacket})`;
    this._bytesIn += len;
    this.opts.onPacket?.(p.subarray(body, body + len));
    return undefined;
  }

  /** The peer broke the protocol on stream s: reset it. Returns the problem for the debug log. */
  private violation(s: MuxStream, problem: string): string {
    const state = s.state;
    const err = new DshieldError(ErrorCodes.STREAM_RESET, `stream to ${s.targetText} reset: the peer broke the protocol (${problem})`, {
      detail: { target: s.targetText, reason: 'protocol' },
    });
    this.queueCtl(s, C_RST);
    this.finishStream(s, err.message);
    if (state === 'opening') {
      s.settle?.(err);
      s.destroy();
    } else if (state === 'pending') {
      s.abort?.abort(err);
      s.destroy();
    } else {
      s.destroy(err);
    }
    return problem;
  }

  // -------------------------------------------------------------------------
  // Stream callbacks (from MuxStream)

  /**
   * Grant the peer more credit once at least half our window is free: free =
   * window - credit the peer still has - data its consumer has not read.
   * `reading`: the consumer asked for more (from _read); then any free space
   * is granted if the peer is out of credit (holds less than a sliver), or a
   * read(n) for more than is buffered could wait forever under the batching
   * threshold. A grant that comes within FAST_HALF_WINDOW_MS of the one
   * before, with nothing left unread, first doubles the window (see
   * MAX_STREAM_WINDOW).
   */
  private grantCredit(s: MuxStream, reading = false): void {
    if (s.state === 'closed' || s.finRecv || this.closed) return;
    const held = s.recvCredit + s.readableLength;
    if (s.window - held < s.window >>> 1 && !(reading && s.recvCredit < CREDIT_SLIVER && s.window > held)) return;
    const now = performance.now();
    if (
      now - s.grantedAt < FAST_HALF_WINDOW_MS &&
      s.readableLength === 0 &&
      s.window * 2 <= this.maxWindow &&
      this.windowGrowth + s.window <= WINDOW_GROWTH_BUDGET
    ) {
      this.windowGrowth += s.window;
      s.window *= 2;
    }
    s.grantedAt = now;
    const free = s.window - held;
    s.recvCredit += free;
    s.grant += free;
    this.queueCtl(s, C_WINDOW);
  }

  /**
   * From _read. Node calls _read before it takes the bytes being read out of
   * the buffer, and not again until the next push, so a grant computed here
   * would see a stale readableLength and, with the peer out of credit, none
   * would ever come. Check once the read is over instead.
   */
  private checkGrantSoon(s: MuxStream): void {
    this.grantChecks.add(s);
    if (this.grantCheckScheduled) return;
    this.grantCheckScheduled = true;
    queueMicrotask(this.grantTask);
  }

  private runGrantChecks(): void {
    this.grantCheckScheduled = false;
    for (const s of this.grantChecks) this.grantCredit(s, true);
    this.grantChecks.clear();
  }

  private streamWrite(s: MuxStream, chunks: Buffer[], bytes: number, cb: WriteCallback): void {
    if (!Mux.sends(s) || this.closed) {
      cb(streamReset(s, `the stream to ${s.targetText} is closed`));
      return;
    }
    if (bytes === 0) {
      cb();
      return;
    }
    if (s.outBytes > 0) {
      // A carried tail (copied, its write already completed) goes first.
      const rest = s.out.slice(s.outIndex);
      if (s.outOffset > 0) rest[0] = rest[0].subarray(s.outOffset);
      s.out = rest.concat(chunks);
      s.outBytes += bytes;
    } else {
      s.out = chunks;
      s.outBytes = bytes;
    }
    s.outIndex = 0;
    s.outOffset = 0;
    s.outCb = cb;
    this.updateReady(s);
  }

  private streamFinal(s: MuxStream): void {
    if (!Mux.sends(s) || this.closed || s.finSent) return;
    if (s.outBytes > 0) {
      s.finAfterData = true;
      return;
    }
    s.finSent = true;
    this.queueCtl(s, C_FIN);
    if (s.finRecv) this.finishStream(s, undefined);
  }

  private streamDestroyed(s: MuxStream, err: Error | null): void {
    if (s.state !== 'closed' && !this.closed) {
      // Destroyed here before the protocol closed: tell the peer.
      const state = s.state;
      this.cancelOrReset(s);
      this.finishStream(s, err ? errorText(err) : 'reset');
      if (state === 'opening') s.settle?.(streamReset(s, `the stream to ${s.targetText} was destroyed while opening`));
    }
    this.ready.delete(s);
    const cb = s.outCb;
    s.outCb = null;
    s.out = NO_CHUNKS;
    s.outBytes = 0;
    if (cb) {
      cb(err ?? streamReset(s, `the stream to ${s.targetText} was destroyed before its data was sent`));
    }
  }

  /** client: the caller's signal fired while opening. */
  private abortOpen(s: MuxStream, err: DshieldError): void {
    if (s.state !== 'opening' || this.closed) return;
    this.cancelOrReset(s);
    this.finishStream(s, undefined);
    s.settle?.(err);
    s.destroy();
  }

  /** Tell the peer s is gone: RST, or nothing at all if its OPEN has not left yet. */
  private cancelOrReset(s: MuxStream): void {
    if (s.ctl & C_OPEN) s.ctl = 0;
    else this.queueCtl(s, C_RST);
  }

  /**
   * The protocol side of s is over: count it, tell the events, wake idle
   * waiters. The map entry goes once its last control frame is out.
   */
  private finishStream(s: MuxStream, error: string | undefined): void {
    if (s.state === 'closed') return;
    this.windowGrowth -= s.window - this.window;
    s.state = 'closed';
    this.active--;
    this.ready.delete(s);
    if (s.opened && this.opts.events) {
      const info: { id: number; target: string; bytesIn: number; bytesOut: number; error?: string } = {
        id: s.id,
        target: s.targetText,
        bytesIn: s.bytesIn,
        bytesOut: s.bytesOut,
      };
      if (error !== undefined) info.error = error;
      this.safely('stream:close listener', () => this.opts.events!.emit('stream:close', info));
    }
    this.release(s);
    if (this.active === 0) for (const w of [...this.idleWaiters]) w();
  }

  private release(s: MuxStream): void {
    if (s.state === 'closed' && s.ctl === 0 && this.streams.get(s.id) === s) this.streams.delete(s.id);
  }

  private emitOpen(s: MuxStream): void {
    const events = this.opts.events;
    if (!events) return;
    const info: { id: number; target: string; client?: string } = { id: s.id, target: s.targetText };
    if (this.opts.client !== undefined) info.client = this.opts.client;
    this.safely('stream:open listener', () => events.emit('stream:open', info));
  }

  // -------------------------------------------------------------------------
  // UDP (called by Assoc)

  private udpSend(a: Assoc, target: Target, payload: Buffer): void {
    if (this.closed) return;
    let address: Buffer;
    try {
      address = encodeAddress(target);
    } catch {
      this.log.debug('mux: dropping a datagram with an invalid address', { id: a.id });
      return;
    }
    const size = FRAME_HEADER + address.length + payload.length;
    if (size - FRAME_HEADER > 0xffff || size > this.maxPayload) {
      this.log.debug('mux: dropping a datagram too large for one record', { id: a.id, bytes: payload.length });
      return;
    }
    if (this.dgramBytes + size > MAX_DGRAM_QUEUE) return; // congested: UDP may drop
    a.lastActive = Date.now();
    this.dgrams.push({ id: a.id, address, payload });
    this.dgramBytes += size;
    this.scheduleFlush();
  }

  private udpClose(a: Assoc): void {
    if (this.udps.get(a.id) === a) {
      this.udps.delete(a.id);
      if (!this.closed) {
        this.ctlFrames.push(encodeFrame(FrameType.UDP_CLOSE, a.id));
        this.scheduleFlush();
      }
    }
    a.ended();
  }

  // -------------------------------------------------------------------------
  // Sending

  private queueCtl(s: MuxStream, bit: number): void {
    if (this.closed) return;
    s.ctl |= bit;
    this.ctlStreams.add(s);
    this.scheduleFlush();
  }

  private reply(frame: Buffer): void {
    // Not congested, the queue empties at the end of this microtask (one
    // payload's worth at most); congested, the peer outruns us: drop, it can ask again.
    if (this.congested && this.replies.size >= MAX_REPLIES) return;
    this.replies.push(frame);
    this.scheduleFlush();
  }

  /** Data to send and credit worth spending on it (all of it, or at least a sliver's worth). */
  private static canSend(s: MuxStream): boolean {
    return s.outBytes > 0 && (s.sendCredit >= s.outBytes || s.sendCredit >= CREDIT_SLIVER);
  }

  /** Whether s may send DATA and FIN: open, or an early stream still opening (its OPEN goes first: control frames lead). */
  private static sends(s: MuxStream): boolean {
    return s.state === 'open' || (s.state === 'opening' && s.early);
  }

  private updateReady(s: MuxStream): void {
    if (Mux.sends(s) && Mux.canSend(s)) {
      if (!this.ready.has(s)) {
        this.ready.add(s);
        this.scheduleFlush();
      }
    } else {
      this.ready.delete(s);
    }
  }

  private scheduleFlush(): void {
    if (this.flushScheduled || this.closed || this.congested) return;
    this.flushScheduled = true;
    queueMicrotask(this.flushTask);
  }

  private runScheduledFlush(): void {
    this.flushScheduled = false;
    if (!this.flushing) this.flush();
  }

  /** Send payloads until there is nothing left (but tails that may wait) or the session says stop. */
  private flush(): void {
    this.flushing = true;
    try {
      while (!this.congested && !this.closed) {
        if (!this.tailsDue && this.onlyTailsWait()) {
          this.scheduleTails();
          break;
        }
        const payload = this.assemble();
        if (payload === null) break;
        if (!this.sendPayload(payload)) return;
        if (this.done.length > 0) {
          // Their bytes are out: let the writers go on (they may write again, re-entering streamWrite).
          const done = this.done;
          this.done = [];
          for (const cb of done) cb();
        }
        if (this.finLater.length > 0) {
          const fins = this.finLater;
          this.finLater = [];
          for (const s of fins) {
            s.finAfterData = false;
            this.streamFinal(s);
          }
        }
      }
    } finally {
      this.flushing = false;
    }
  }

  /**
   * True when all that waits is carried tails: slivers of writes that filled
   * a payload, whose writers were told to go on (see writeData). A stream
   * fed by a socket writes once per read, and each read runs its own
   * microtasks, so flushing at the end of the microtask would send every
   * tail in a record of its own: a 64 KiB read fills one payload and leaves
   * 46 bytes, and with it came a second seal, write and TCP segment per read.
   * Tails wait instead for the end of this event-loop turn (setImmediate),
   * by which time the reads that were ready in this turn have joined them.
   * A non-tail stream is usually first in `ready`, so this is O(1) then.
   */
  private onlyTailsWait(): boolean {
    if (this.ready.size === 0) return false;
    if (this.ctlStreams.size + this.ctlFrames.size + this.replies.size + this.dgrams.size + this.packets.size > 0) return false;
    for (const s of this.ready) {
      if (s.outCb !== null || s.outBytes > this.minFragment) return false;
    }
    return true;
  }

  private scheduleTails(): void {
    if (this.tailsScheduled) return;
    this.tailsScheduled = true;
    setImmediate(this.tailsTask);
  }

  private runTails(): void {
    this.tailsScheduled = false;
    if (this.closed || this.flushing) return;
    this.tailsDue = true;
    try {
      this.flush();
    } finally {
      this.tailsDue = false;
    }
  }

  /** Hands one payload to the session. False when send threw and the mux closed. */
  private sendPayload(payload: Buffer): boolean {
    this.inSend = true;
    this.drainedDuringSend = false;
    let ok: boolean;
    try {
      ok = this.opts.send(payload);
    } catch (err) {
      this.inSend = false;
      this.log.error('mux: send threw; closing the mux', { error: errorText(err) });
      this.close(err instanceof Error ? err : new Error(String(err)));
      return false;
    }
    this.inSend = false;
    if (!ok && !this.drainedDuringSend) this.congested = true;
    this._lastActivity = Date.now();
    return true;
  }

  /** Build one payload: control frames, then datagrams, then DATA round-robin. Null when idle. */
  private assemble(): Buffer | null {
    if (this.ctlStreams.size + this.ctlFrames.size + this.replies.size + this.dgrams.size + this.packets.size + this.ready.size === 0) {
      return null;
    }
    const own = this.opts.payloadBuffer?.();
    const start = own ? 0 : slabReserve(this.maxPayload);
    const slab = (this.slab = own ?? sharedSlab);
    this.pos = start;
    this.limit = start + this.maxPayload;
    if (this.writeControl() && this.writeDatagrams() && this.writePackets()) this.writeData();
    const end = this.pos;
    if (!own) slabCommit(end);
    this.slab = EMPTY;
    return end > start ? slab.subarray(start, end) : null;
  }

  /** Returns true when every control frame is written. */
  private writeControl(): boolean {
    for (const s of this.ctlStreams) {
      if (!this.writeStreamControl(s)) return false;
      this.ctlStreams.delete(s);
      this.release(s);
    }
    return this.writeFrames(this.ctlFrames) && this.writeFrames(this.replies);
  }

  private writeFrames(queue: Fifo<Buffer>): boolean {
    while (queue.size > 0) {
      const frame = queue.peek();
      if (this.pos + frame.length > this.limit) return false;
      frame.copy(this.slab, this.pos);
      this.pos += frame.length;
      queue.shift();
    }
    return true;
  }

  /** Writes s's pending control frames in wire order; false when the payload is full. */
  private writeStreamControl(s: MuxStream): boolean {
    const slab = this.slab;
    if (s.ctl & C_OPEN) {
      const body = s.ctlBody!;
      if (this.pos + FRAME_HEADER + body.length > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.OPEN, s.id, body.length);
      body.copy(slab, this.pos + FRAME_HEADER);
      this.pos += FRAME_HEADER + body.length;
      s.ctl &= ~C_OPEN;
    }
    if (s.ctl & C_OPEN_OK) {
      if (this.pos + FRAME_HEADER > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.OPEN_OK, s.id, 0);
      this.pos += FRAME_HEADER;
      s.ctl &= ~C_OPEN_OK;
    }
    if (s.ctl & C_OPEN_ERR) {
      const body = s.ctlBody!;
      if (this.pos + FRAME_HEADER + body.length > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.OPEN_ERR, s.id, body.length);
      body.copy(slab, this.pos + FRAME_HEADER);
      this.pos += FRAME_HEADER + body.length;
      s.ctl &= ~C_OPEN_ERR;
    }
    if (s.ctl & C_WINDOW) {
      if (this.pos + FRAME_HEADER + 4 > this.limit) return false;
      // A grant for a closed stream (or after the peer's FIN) is pointless.
      if (s.grant > 0 && s.state !== 'closed' && !s.finRecv) {
        writeHeader(slab, this.pos, FrameType.WINDOW, s.id, 4);
        slab.writeUInt32BE(s.grant, this.pos + FRAME_HEADER);
        this.pos += FRAME_HEADER + 4;
      }
      s.grant = 0;
      s.ctl &= ~C_WINDOW;
    }
    if (s.ctl & C_FIN) {
      if (this.pos + FRAME_HEADER > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.FIN, s.id, 0);
      this.pos += FRAME_HEADER;
      s.ctl &= ~C_FIN;
    }
    if (s.ctl & C_RST) {
      if (this.pos + FRAME_HEADER > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.RST, s.id, 0);
      this.pos += FRAME_HEADER;
      s.ctl &= ~C_RST;
    }
    return true;
  }

  private writeDatagrams(): boolean {
    const slab = this.slab;
    while (this.dgrams.size > 0) {
      const d = this.dgrams.peek();
      const bodyLen = d.address.length + d.payload.length;
      if (this.pos + FRAME_HEADER + bodyLen > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.UDP_DATA, d.id, bodyLen);
      d.address.copy(slab, this.pos + FRAME_HEADER);
      d.payload.copy(slab, this.pos + FRAME_HEADER + d.address.length);
      this.pos += FRAME_HEADER + bodyLen;
      this.dgramBytes -= FRAME_HEADER + bodyLen;
      this._bytesOut += d.payload.length;
      this.dgrams.shift();
    }
    return true;
  }

  private writePackets(): boolean {
    const slab = this.slab;
    while (this.packets.size > 0) {
      const packet = this.packets.peek();
      if (this.pos + FRAME_HEADER + packet.length > this.limit) return false;
      writeHeader(slab, this.pos, FrameType.PACKET, 0, packet.length);
      packet.copy(slab, this.pos + FRAME_HEADER);
      this.pos += FRAME_HEADER + packet.length;
      this.packetBytes -= packet.length;
      this._bytesOut += packet.length;
      this.packets.shift();
    }
    return true;
  }

  /** One DATA frame per ready stream per turn until the payload is full. */
  private writeData(): void {
    const ready = this.ready;
    while (ready.size > 0) {
      const room = this.limit - this.pos - FRAME_HEADER;
      if (room <= 0) return;
      const s: MuxStream = ready.values().next().value!;
      let n = Math.min(MAX_DATA, s.sendCredit, s.outBytes);
      if (n > room) {
        if (room < this.minFragment) return; // not worth a sliver: next payload
        n = room;
      }
      writeHeader(this.slab, this.pos, FrameType.DATA, s.id, n);
      this.pos += FRAME_HEADER;
      this.copyOut(s, n);
      s.sendCredit -= n;
      s.bytesOut += n;
      this._bytesOut += n;
      ready.delete(s);
      if (s.outBytes === 0) {
        const cb = s.outCb;
        s.outCb = null;
        s.out = NO_CHUNKS;
        if (cb) this.done.push(cb);
        if (s.finAfterData) this.finLater.push(s);
      } else if (s.outBytes <= this.minFragment && s.outCb !== null && this.limit - this.pos - FRAME_HEADER < s.outBytes) {
        // The payload is full and only a sliver of this write is left: copy
        // it and complete the write, so the writer's next data can join the
        // sliver in the next payload instead of it going out alone.
        this.carry(s);
        if (Mux.canSend(s)) ready.add(s);
      } else if (Mux.canSend(s)) {
        ready.add(s); // to the back of the round-robin
      }
    }
  }

  private carry(s: MuxStream): void {
    const tail = Buffer.allocUnsafe(s.outBytes);
    let at = 0;
    for (let i = s.outIndex; i < s.out.length; i++) {
      const chunk = s.out[i];
      const from = i === s.outIndex ? s.outOffset : 0;
      chunk.copy(tail, at, from);
      at += chunk.length - from;
    }
    s.out = [tail];
    s.outIndex = 0;
    s.outOffset = 0;
    this.done.push(s.outCb!);
    s.outCb = null;
  }

  private copyOut(s: MuxStream, n: number): void {
    const slab = this.slab;
    let pos = this.pos;
    let left = n;
    while (left > 0) {
      const chunk = s.out[s.outIndex];
      const avail = chunk.length - s.outOffset;
      const take = avail < left ? avail : left;
      chunk.copy(slab, pos, s.outOffset, s.outOffset + take);
      pos += take;
      left -= take;
      s.outOffset += take;
      if (s.outOffset === chunk.length) {
        s.outIndex++;
        s.outOffset = 0;
      }
    }
    s.outBytes -= n;
    this.pos = pos;
  }

  private safely(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.error(`mux: a ${what} threw`, { error: errorText(err) });
    }
  }
}

// ---------------------------------------------------------------------------
// Payload memory

/**
 * Payloads are carved from one slab shared by every mux of the process (like
 * Node's Buffer pool), so an idle mux holds no send buffer and a busy one
 * allocates once per SLAB_SIZE bytes. A region is never written again once
 * handed to `send`, so the session may keep it; a full slab is replaced and
 * lives on only while payloads cut from it do. Assembly is synchronous and
 * runs no foreign code, so muxes never interleave in the slab.
 */
const SLAB_SIZE = 1024 * 1024;

/**
 * Stream data for a reader: a view of the payload when the data is most of
 * the memory behind it, else a copy. A view keeps all that memory alive while
 * the reader holds the chunk, so small frames are copied: a peer packing one
 * tiny DATA frame into each large record must not pin 64 KiB per byte of
 * window. Views pin at most VIEW_MAX_WASTE times the data they hold, plus
 * VIEW_FRAMING for what surrounds the frames of a full record in its memory
 * (the record's type and tag, four frame headers, the transport's length
 * prefixes): so all four DATA frames of a full 64 KiB record are views,
 * the last one too (16,338 bytes, shorter by the headers).
 */
const VIEW_MIN_BYTES = 4096;
const VIEW_MAX_WASTE = 4;
const VIEW_FRAMING = 256;

/**
 * Frames whose handling keeps no reference into the payload but the DATA
 * views it counts: the others (UDP datagrams, TUN packets, OPEN's target,
 * pings) go to code that may hold on to a view of the record.
 */
function keepsNoView(type: number): boolean {
  return type === FrameType.DATA || type === FrameType.WINDOW || type === FrameType.OPEN_OK || type === FrameType.FIN || type === FrameType.RST;
}

function dataChunk(p: Buffer, body: number, len: number): Buffer {
  if (len >= VIEW_MIN_BYTES && len * VIEW_MAX_WASTE + VIEW_FRAMING >= p.buffer.byteLength) {
    const view = p.subarray(body, body + len);
    countView(view); // record memory is reused once its reader releases this (core/record-memory.ts)
    return view;
  }
  const chunk = Buffer.allocUnsafe(len);
  p.copy(chunk, 0, body, body + len);
  return chunk;
}
const EMPTY = Buffer.alloc(0);
let sharedSlab: Buffer = EMPTY;
let slabUsed = 0;

/** Makes room for `size` bytes; returns where the payload starts. */
function slabReserve(size: number): number {
  if (sharedSlab.length - slabUsed < size) {
    sharedSlab = Buffer.allocUnsafe(Math.max(SLAB_SIZE, size));
    slabUsed = 0;
  }
  return slabUsed;
}

function slabCommit(end: number): void {
  slabUsed = (end + 7) & ~7;
}

// ---------------------------------------------------------------------------
// Frames and addresses

/**
 * Whether buf[start, end) is one or more PACKET frames and nothing else,
 * each of 1..maxPacket bytes, and `accept(buf, at, length, context)` (if
 * given) takes the body of each. Stops at the first that is not. For the
 * thread that writes packets into the TUN without a Mux
 * (core/datapath/packet-worker.ts); `context` is passed through so that
 * caller needs no closure a packet.
 */
export function isPacketsOnly<C>(
  buf: Buffer,
  start: number,
  end: number,
  maxPacket: number,
  accept?: (buf: Buffer, at: number, length: number, context: C) => boolean,
  context?: C,
): boolean {
  if (start >= end) return false;
  for (let at = start; at < end; ) {
    // A PACKET frame's stream id is 0: all four of its bytes.
    if (end - at < FRAME_HEADER || buf[at] !== FrameType.PACKET || (buf[at + 1]! | buf[at + 2]! | buf[at + 3]! | buf[at + 4]!) !== 0) return false;
    const length = u16be(buf, at + 5);
    const body = at + FRAME_HEADER;
    if (length === 0 || length > maxPacket || body + length > end) return false;
    if (accept !== undefined && !accept(buf, body, length, context as C)) return false;
    at = body + length;
  }
  return true;
}

function writeHeader(buf: Buffer, at: number, type: number, id: number, length: number): void {
  buf[at] = type;
  buf.writeUInt32BE(id, at + 1);
  buf.writeUInt16BE(length, at + 5);
}

/** One frame as its own buffer (control frames and tests). */
export function encodeFrame(type: number, id: number, body?: Uint8Array): Buffer {
  const len = body ? body.length : 0;
  const frame = Buffer.allocUnsafe(FRAME_HEADER + len);
  writeHeader(frame, 0, type, id, len);
  if (body) frame.set(body, FRAME_HEADER);
  return frame;
}

const ATYP_IPV4 = 0x01;
const ATYP_DOMAIN = 0x03;
const ATYP_IPV6 = 0x04;

/** "host:port", IPv6 in brackets. */
export function formatTarget(t: Target): string {
  return t.host.includes(':') ? `[${t.host}]:${t.port}` : `${t.host}:${t.port}`;
}

/**
 * Encodes a Target as an Address. Throws DshieldError(DESTINATION) for a host
 * or port that cannot be sent (reason 'dns' for a bad name, 'unreachable' for a bad port).
 */
export function encodeAddress(t: Target): Buffer {
  const { host, port } = t;
  if (!Number.isInteger(port) || port < 0 || port > 0xffff) {
    throw new DshieldError(ErrorCodes.DESTINATION, `invalid destination port ${String(port)} for ${host}`, {
      detail: { reason: 'unreachable', target: `${host}:${port}` },
    });
  }
  let out: Buffer;
  if (isIPv4(host)) {
    out = Buffer.allocUnsafe(7);
    out[0] = ATYP_IPV4;
    const parts = host.split('.');
    for (let i = 0; i < 4; i++) out[1 + i] = Number(parts[i]);
  } else if (isIPv6(host) && !host.includes('%')) {
    out = Buffer.allocUnsafe(19);
    out[0] = ATYP_IPV6;
    ipv6ToBytes(host).copy(out, 1);
  } else {
    const len = Buffer.byteLength(host);
    if (len < 1 || len > 255 || len !== host.length || !isHostname(host)) {
      throw new DshieldError(ErrorCodes.DESTINATION, `invalid destination host "${host.slice(0, 64)}"`, {
        detail: { reason: 'dns', target: `${host.slice(0, 64)}:${port}` },
      });
    }
    out = Buffer.allocUnsafe(4 + len);
    out[0] = ATYP_DOMAIN;
    out[1] = len;
    out.write(host, 2, 'latin1');
  }
  out.writeUInt16BE(port, out.length - 2);
  return out;
}

/** Bytes the Address at `at` takes (valid only after decodeAddress succeeded). */
function addressLength(p: Buffer, at: number): number {
  const atyp = p[at];
  return atyp === ATYP_IPV4 ? 7 : atyp === ATYP_IPV6 ? 19 : 4 + p[at + 1];
}

/**
 * Decodes the Address in p[at, end). `exact`: it must fill the range (OPEN);
 * otherwise bytes may follow (UDP_DATA). Null when malformed.
 */
export function decodeAddress(p: Buffer, at: number, end: number, exact: boolean): Target | null {
  if (end - at < 1) return null;
  const atyp = p[at];
  let host: string;
  let size: number;
  if (atyp === ATYP_IPV4) {
    size = 7;
    if (end - at < size) return null;
    host = `${p[at + 1]}.${p[at + 2]}.${p[at + 3]}.${p[at + 4]}`;
  } else if (atyp === ATYP_IPV6) {
    size = 19;
    if (end - at < size) return null;
    host = bytesToIpv6(p, at + 1);
  } else if (atyp === ATYP_DOMAIN) {
    if (end - at < 2) return null;
    const len = p[at + 1];
    size = 4 + len;
    if (len === 0 || end - at < size) return null;
    for (let i = at + 2; i < at + 2 + len; i++) if (!HOSTNAME_BYTE[p[i]]) return null;
    host = p.toString('latin1', at + 2, at + 2 + len);
  } else {
    return null;
  }
  if (exact && end - at !== size) return null;
  return { host, port: p.readUInt16BE(at + size - 2) };
}

/** Bytes a domain name may hold on the wire: letters, digits, '-', '.', '_' (IDNs travel as punycode). */
const HOSTNAME_BYTE = new Uint8Array(256);
for (const c of 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._') HOSTNAME_BYTE[c.charCodeAt(0)] = 1;

function isHostname(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c > 0xff || !HOSTNAME_BYTE[c]) return false;
  }
  return true;
}

function isVisibleAscii(s: string): boolean {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x21 || c > 0x7e) return false;
  }
  return true;
}

/** Parses an address that net.isIPv6 accepted (no zone id). */
function ipv6ToBytes(s: string): Buffer {
  const groups = (part: string): number[] => {
    if (part === '') return [];
    const out: number[] = [];
    for (const g of part.split(':')) {
      if (g.includes('.')) {
        const [a, b, c, d] = g.split('.').map(Number);
        out.push((a << 8) | b, (c << 8) | d);
      } else {
        out.push(parseInt(g, 16));
      }
    }
    return out;
  };
  const gap = s.indexOf('::');
  const head = groups(gap >= 0 ? s.slice(0, gap) : s);
  const tail = gap >= 0 ? groups(s.slice(gap + 2)) : [];
  const all = [...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail];
  const out = Buffer.allocUnsafe(16);
  for (let i = 0; i < 8; i++) out.writeUInt16BE(all[i], i * 2);
  return out;
}

/** RFC 5952 text: lowercase, longest zero run (>= 2 groups) as "::", IPv4-mapped as ::ffff:a.b.c.d. */
function bytesToIpv6(p: Buffer, at: number): string {
  const g: number[] = [];
  for (let i = 0; i < 8; i++) g.push(p.readUInt16BE(at + i * 2));
  if (g[0] === 0 && g[1] === 0 && g[2] === 0 && g[3] === 0 && g[4] === 0 && g[5] === 0xffff) {
    return `::ffff:${p[at + 12]}.${p[at + 13]}.${p[at + 14]}.${p[at + 15]}`;
  }
  let bestStart = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    if (g[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) {
      bestStart = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (a: number[]) => a.map((x) => x.toString(16)).join(':');
  if (bestStart < 0) return hex(g);
  return `${hex(g.slice(0, bestStart))}::${hex(g.slice(bestStart + bestLen))}`;
}

// ---------------------------------------------------------------------------
// Errors

function tunnelDown(message: string, cause?: unknown): DshieldError {
  return new DshieldError(ErrorCodes.TUNNEL_DOWN, message, cause !== undefined ? { cause } : undefined);
}

function streamReset(s: MuxStream, message: string): DshieldError {
  return new DshieldError(ErrorCodes.STREAM_RESET, message, { detail: { target: s.targetText } });
}

function abortError(signal: AbortSignal, target: string): DshieldError {
  const reason: unknown = signal.reason;
  if (isDshieldError(reason)) return reason;
  if (reason instanceof Error && reason.name === 'TimeoutError') {
    return new DshieldError(ErrorCodes.DESTINATION, `opening ${target} timed out`, {
      cause: reason,
      detail: { reason: 'timeout', target },
    });
  }
  return new DshieldError(ErrorCodes.STREAM_RESET, `opening ${target} was aborted`, { cause: reason, detail: { target } });
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

const ERRNO_REASONS: Record<string, string> = {
  ECONNREFUSED: 'refused',
  ECONNRESET: 'refused',
  ENOTFOUND: 'dns',
  EAI_AGAIN: 'dns',
  EAI_NONAME: 'dns',
  EAI_FAIL: 'dns',
  EAI_NODATA: 'dns',
  ETIMEDOUT: 'timeout',
  EHOSTUNREACH: 'unreachable',
  ENETUNREACH: 'unreachable',
  EHOSTDOWN: 'unreachable',
  ENETDOWN: 'unreachable',
  EADDRNOTAVAIL: 'unreachable',
};

/** Maps what the server's open failed with to an OPEN_ERR code byte and reason. */
function toWireError(err: unknown): { code: number; reason: string | undefined } {
  if (isDshieldError(err)) {
    const index = WIRE_ERROR_CODES.indexOf(err.code);
    const reason = err.detail?.reason;
    return { code: index + 1, reason: typeof reason === 'string' ? reason : undefined };
  }
  const errno = (err as { code?: unknown } | null)?.code;
  if (typeof errno === 'string' && errno in ERRNO_REASONS) {
    return { code: WIRE_ERROR_CODES.indexOf(ErrorCodes.DESTINATION) + 1, reason: ERRNO_REASONS[errno] };
  }
  if (err instanceof Error && (err.name === 'TimeoutError' || err.name === 'AbortError')) {
    return { code: WIRE_ERROR_CODES.indexOf(ErrorCodes.DESTINATION) + 1, reason: 'timeout' };
  }
  return { code: 0, reason: undefined };
}

function encodeOpenError(code: number, reason: string | undefined): Buffer {
  const text = reason !== undefined && reason.length <= MAX_REASON && isVisibleAscii(reason) ? reason : '';
  const body = Buffer.allocUnsafe(1 + text.length);
  body[0] = code;
  body.write(text, 1, 'latin1');
  return body;
}

function asciiOrUndefined(p: Buffer, start: number, end: number): string | undefined {
  for (let i = start; i < end; i++) if (p[i] < 0x21 || p[i] > 0x7e) return undefined;
  return p.toString('latin1', start, end);
}

/** The client's error for an OPEN_ERR: same code and reason as the server's. */
function openError(wireCode: number, reason: string | undefined, target: string): DshieldError {
  // 0 or a code from a newer peer: the server could not open it, for a reason we do not know.
  const code = WIRE_ERROR_CODES[wireCode - 1] ?? ErrorCodes.DESTINATION;
  const detail: Record<string, unknown> = { target };
  if (reason !== undefined) detail.reason = reason;
  let message: string;
  switch (code) {
    case ErrorCodes.EGRESS_DENIED:
      message = `the server's egress policy does not allow ${target}`;
      break;
    case ErrorCodes.DESTINATION:
      message = `the server could not connect to ${target}${reason ? ` (${reason})` : ''}`;
      break;
    case ErrorCodes.STREAM_RESET:
      message = `the server refused the stream to ${target}`;
      break;
    case ErrorCodes.TUNNEL_DOWN:
      message = `the server is shutting down and refused ${target}`;
      break;
    default:
      message = `the server could not open ${target} (${code})`;
  }
  return new DshieldError(code, message, { detail });
}
