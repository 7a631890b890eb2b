/**
 * One secure session over one Link: the Noise handshake (client = initiator,
 * server = responder), then encrypted records, rekeying, and a clean close.
 *
 * Handshake (dshield/1, prologue "dshield/1"):
 *   client -> server  one record: Noise IK(psk2) message 1,
 *                     payload = TAI64N timestamp (12 bytes) || UTF-8 JSON
 *   server -> client  one record: Noise message 2, payload = UTF-8 JSON (session parameters)
 * The server answers nothing to an initiation it cannot authenticate, from a
 * key it does not know, with a timestamp it has seen, or that respond()
 * refuses: it reads and discards until handshakeTimeoutMs, then drops the link.
 *
 * Records after the handshake (stream links): AEAD(key, implicit counter,
 * ad = empty, plaintext = type (1 byte) || body).
 *   0 DATA            body = one mux payload
 *   1 REKEY_INIT      body = Noise message 1 of a new handshake (client -> server)
 *   2 REKEY_RESPONSE  body = Noise message 2 (server -> client)
 *   3 CLOSE           empty: the sender is closing on purpose
 * Other types are ignored (room for later additions). A record that fails
 * authentication means the byte stream was altered: the session is destroyed.
 *
 * Rekey: the client starts a new handshake inside the session every
 * rekeyAfterMs. The server answers under its old sending key, then sends
 * under the new one; the client switches both directions when it reads the
 * answer. The server keeps its old receiving key until a record under the
 * new one authenticates, so records in flight either way are never lost.
 * A side whose keys get older than rejectAfterMs closes the session.
 */
import { DshieldError, ErrorCodes, errorWithoutStack } from './errors.ts';
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
import { NoiseError, type CipherState, type HandshakePattern, type HandshakeState, type HashName, type TransportKeys } from './noise.ts';
import { ReplayGuard } from './replay.ts';
import type { AuthPlugin, CipherPlugin, ClientIdentity, Link, LinkHandlers, Logger, TunOffload } from './types.ts';
import type { KeyPair } from './x25519.ts';

export type { HashName } from './noise.ts';
export { ReplayGuard } from './replay.ts';

export interface SessionHandlers {
  /** One decrypted mux payload (record type 0). The buffer is the receiver's to keep. */
  message(payload: Buffer): void;
  /** The link drained after send() returned false. */
  drain(): void;
  /** Called exactly once. No error: a clean close (ours or the peer's CLOSE record). */
  close(err?: Error): void;
  /** Optional: the session switched to new keys (for the 'session:rekey' event). */
  rekey?(): void;
}

export interface Session {
  readonly side: 'client' | 'server';
  readonly remoteAddress: string;
  /** Server side: who the client is. */
  readonly peer?: ClientIdentity;
  /** Client side: the server's response payload. Server side: the client's initiation JSON (without timestamp). */
  readonly params: Record<string, unknown>;
  /** Largest payload send() accepts: link.maxRecordSize - 16 (tag) - 1 (type). */
  readonly maxPayload: number;
  /**
   * True when payloads may be lost, duplicated away or reordered (a datagram
   * session, core/session-datagram.ts): its mux must run in lossy mode.
   * Absent or false: every payload arrives once, in order (stream sessions).
   */
  readonly lossy?: boolean;
  /** Records arriving before start are queued (bounded) and delivered on start. Call once. */
  start(handlers: SessionHandlers): void;
  /** Encrypts (type 0 || payload) as one record. False: wait for drain. Throws RangeError above maxPayload. */
  send(payload: Buffer): boolean;
  /** Several records in one link write. */
  sendBatch?(payloads: Buffer[]): boolean;
  /**
   * Memory for the next payload to sendInPlace: maxPayload bytes with room
   * around them for the record's type, tag and the link's framing. Valid
   * until the next sendInPlace; asking again without sending returns the same.
   * Absent together with sendInPlace.
   */
  payloadBuffer?(): Buffer;
  /**
   * Like send, without copying: `payload` must be a prefix of the latest
   * payloadBuffer(); the record is sealed over that memory in place.
   */
  sendInPlace?(payload: Buffer): boolean;
  /** Record bytes on the wire (handshake included, transport framing excluded). */
  readonly bytesIn: number;
  readonly bytesOut: number;
  /** Date.now() of the last authenticated record. */
  readonly lastReceivedAt: number;
  /** Graceful: tell the peer (CLOSE record), then the link flushes and closes. handlers.close() is called synchronously, without error. */
  close(): void;
  /** Drop the link at once; handlers.close(err) is called synchronously. */
  destroy(err?: Error): void;
  /**
   * Optional (datagram sessions whose endpoint and cipher allow a packet
   * thread, core/datapath/): from now on, lone packets may take that thread
   * both ways. Records that carry only PACKET frames from `sink`'s allowed
   * source may be opened there and written straight into `sink.fd` (a TUN
   * fd; the thread writes to a dup) without reaching handlers.message, and
   * packets it reads from the TUN (when the sink lends their reading) are
   * sealed and sent under this session's keys. Everything else goes as
   * before. Returns the function that stops it, or undefined when the
   * session cannot. Call at most once; it also ends with the session.
   */
  offloadPackets?(sink: PacketSink): (() => void) | undefined;
}

/** Where a session's incoming IP packets may be written by a packet thread (Session.offloadPackets). */
export interface PacketSink extends TunOffload {
  /** The only IPv4 source address a packet may carry ("10.66.0.2"); absent: any. */
  source4?: string;
  /** The only IPv6 source address; absent with source4 set: IPv6 packets take the main thread. */
  source6?: string;
  /** Longer packets take the main thread (which refuses them). */
  maxPacket: number;
}

export interface ClientHandshakeOptions {
  cipher: CipherPlugin;
  hash: HashName;
  staticKey: KeyPair;
  serverPublicKey: Buffer;
  psk?: Buffer;
  /** JSON carried in the initiation after the timestamp. */
  payload?: Record<string, unknown>;
  handshakeTimeoutMs: number;
  log: Logger;
  /** Default 120_000: the client starts a rekey handshake inside the session. */
  rekeyAfterMs?: number;
  /** Default 180_000: keys older than this are refused (the session closes). */
  rejectAfterMs?: number;
}

export interface ServerAcceptOptions {
  cipher: CipherPlugin;
  hash: HashName;
  staticKey: KeyPair;
  auth: AuthPlugin;
  replay: ReplayGuard;
  handshakeTimeoutMs: number;
  log: Logger;
  /** Session parameters for the response payload; may throw DshieldError to refuse (then: silence, and onRefused). */
  respond(identity: ClientIdentity, initPayload: Record<string, unknown>): Record<string, unknown>;
  onSession(session: Session): void;
  /**
   * For logging, at most once per link: 'bad handshake' | 'unknown client key' |
   * 'psk mismatch' | 'replayed initiation' | 'refused: <why>' | 'timeout' (nothing
   * arrived in time), and the link's remote address. A link the peer closes
   * without sending a record is not reported.
   */
  onRefused(reason: string, remote: string): void;
  rekeyAfterMs?: number;
  rejectAfterMs?: number;
}

const TAG_LENGTH = 16;
const EMPTY = Buffer.alloc(0);

/**
 * The memory payloadBuffer() hands out, shared by every stream session of the
 * process (assembly and sealing are synchronous, so they never interleave).
 * A record the link hands to the OS at once (bufferedAmount 0 after the send,
 * see Link.send) leaves it free for the next payload; one the link has to
 * queue keeps it, and the next payload gets new memory. Reusing it matters:
 * writing into freshly allocated memory costs page faults, measured at ~10x
 * the copy itself (0.4 s against 0.04 s per GiB).
 */
let spareRecord: Buffer | null = null;

const DATA = 0;
const REKEY_INIT = 1;
const REKEY_RESPONSE = 2;
const CLOSE = 3;

const DEFAULT_REKEY_AFTER_MS = 120_000;
const DEFAULT_REJECT_AFTER_MS = 180_000;
/** The client also rekeys after this many records in either direction (counters stop at 2^53 - 1). */
const REKEY_AFTER_RECORDS = 2 ** 48;
/** Payload bytes held for a session whose owner has not called start() yet. */
const PRESTART_QUEUE_LIMIT = 1 << 20;

// ---------------------------------------------------------------------------
// The session after the handshake

interface RekeyRole {
  /** Client: a fresh initiator for a rekey handshake. */
  newInitiator?: () => HandshakeState;
  /** Server: answer a rekey message 1 from the same client, or throw. */
  answer?: (message1: Buffer) => { message2: Buffer; keys: TransportKeys };
}

interface SessionInit {
  side: 'client' | 'server';
  link: Link;
  keys: TransportKeys;
  peer?: ClientIdentity;
  params: Record<string, unknown>;
  log: Logger;
  rekeyAfterMs: number;
  rejectAfterMs: number;
  role: RekeyRole;
  bytesIn: number;
  bytesOut: number;
}

class SecureSession implements Session {
  readonly side: 'client' | 'server';
  readonly remoteAddress: string;
  readonly peer?: ClientIdentity;
  readonly params: Record<string, unknown>;
  readonly maxPayload: number;
  bytesIn: number;
  bytesOut: number;
  lastReceivedAt = Date.now();
  /** Completed rekeys (for logs and tests). */
  rekeys = 0;

  private readonly link: Link;
  private readonly log: Logger;
  private readonly role: RekeyRole;
  private readonly rekeyAfterMs: number;
  private readonly rejectAfterMs: number;

  private sendKey: CipherState;
  private sendBornAt: number;
  private receiveKey: CipherState;
  private receiveBornAt: number;
  /** Server: the receiving key of a rekey the client has not used yet. */
  private nextReceive: { key: CipherState; bornAt: number } | null = null;
  /** Client: the rekey handshake waiting for its answer. */
  private pendingRekey: HandshakeState | null = null;

  private handlers: SessionHandlers | null = null;
  private queued: Buffer[] = [];
  private queuedBytes = 0;
  private drainPending = false;
  private closeResult: { err?: Error } | null = null;
  /** closed: close(), destroy(), the peer's CLOSE or the link's end; handlers.close is then called or due. */
  private state: 'open' | 'closed' = 'open';
  private rekeyTimer: NodeJS.Timeout | null = null;
  private rejectTimer: NodeJS.Timeout | null = null;
  /** Plaintext assembly (type || body), reused: encrypt() returns a fresh buffer. */
  private scratch: Buffer = Buffer.alloc(0);

  constructor(init: SessionInit) {
    this.side = init.side;
    this.link = init.link;
    this.remoteAddress = init.link.remoteAddress;
    this.peer = init.peer;
    this.params = init.params;
    this.maxPayload = init.link.maxRecordSize - TAG_LENGTH - 1;
    this.log = init.log;
    this.role = init.role;
    this.rekeyAfterMs = init.rekeyAfterMs;
    this.rejectAfterMs = init.rejectAfterMs;
    this.bytesIn = init.bytesIn;
    this.bytesOut = init.bytesOut;
    const now = Date.now();
    this.sendKey = init.keys.send;
    this.receiveKey = init.keys.receive;
    this.sendBornAt = now;
    this.receiveBornAt = now;
    this.scheduleTimers();
  }

  // --- public API

  start(handlers: SessionHandlers): void {
    if (this.handlers !== null) throw new Error('session.start() called twice');
    this.handlers = handlers;
    const queued = this.queued;
    this.queued = [];
    this.queuedBytes = 0;
    // Deliver what authenticated before start, even if the session has closed since.
    for (const payload of queued) {
      if (this.closeDelivered) break; // the handler destroyed the session
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
    const record = this.seal(DATA, payload);
    if (record === null) return false;
    this.bytesOut += record.length;
    const more = this.link.send(record);
    this.rekeyIfWornOut();
    return more;
  }

  payloadBuffer(): Buffer {
    const before = 1 + (this.link.headroom ?? 0);
    const size = before + this.maxPayload + TAG_LENGTH;
    if (spareRecord === null || spareRecord.length < size) spareRecord = Buffer.allocUnsafe(size);
    return spareRecord.subarray(before, before + this.maxPayload);
  }

  sendInPlace(payload: Buffer): boolean {
    const memory = payload.buffer;
    // Unless the link takes the record at once, it keeps the memory: the next payload needs new.
    let reusable = false;
    try {
      if (this.state !== 'open') return false;
      if (payload.length > this.maxPayload) {
        throw new RangeError(`session payload of ${payload.length} bytes exceeds maxPayload ${this.maxPayload}`);
      }
      const start = payload.byteOffset - 1;
      const plaintext = Buffer.from(memory, start, payload.length + 1);
      plaintext[0] = DATA;
      const record = this.sealed(plaintext, Buffer.from(memory, start, payload.length + 1 + TAG_LENGTH));
      if (record === null) return false;
      this.bytesOut += record.length;
      // A cipher may answer with a fresh buffer instead of sealing in place: that one has no room for framing.
      const link = this.link;
      const more = record.buffer === memory && record.byteOffset === start && link.sendInPlace !== undefined ? link.sendInPlace(record) : link.send(record);
      reusable = link.bufferedAmount === 0;
      this.rekeyIfWornOut();
      return more;
    } finally {
      if (!reusable && spareRecord !== null && spareRecord.buffer === memory) spareRecord = null;
    }
  }

  sendBatch(payloads: Buffer[]): boolean {
    if (this.state !== 'open') return false;
    const records: Buffer[] = new Array(payloads.length);
    for (let i = 0; i < payloads.length; i++) {
      const payload = payloads[i]!;
      if (payload.length > this.maxPayload) {
        throw new RangeError(`session payload of ${payload.length} bytes exceeds maxPayload ${this.maxPayload}`);
      }
      const record = this.seal(DATA, payload);
      if (record === null) return false;
      this.bytesOut += record.length;
      records[i] = record;
    }
    const more = this.link.sendBatch(records);
    this.rekeyIfWornOut();
    return more;
  }

  close(): void {
    if (this.state !== 'open') return;
    const record = this.seal(CLOSE, EMPTY);
    if (record === null) return; // seal failed and destroyed the session
    this.bytesOut += record.length;
    this.link.send(record);
    this.state = 'closed';
    this.clearTimers();
    // The verdict now (callers may exit right after close()); the link flushes on its own.
    this.finish();
    this.link.close();
  }

  destroy(err?: Error): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.clearTimers();
    // First the verdict, then the link: a link may report its close synchronously.
    this.finish(err);
    this.link.destroy();
  }

  // --- link callbacks (wired by connectSession / acceptSession)

  onRecord(record: Buffer): void {
    // After close() or destroy() nothing more is read or delivered.
    if (this.state !== 'open') return;
    this.bytesIn += record.length;
    // In place when there is no second key to try: a failed in-place attempt may wipe the record.
    const out = this.nextReceive === null ? record.subarray(0, record.length - TAG_LENGTH) : undefined;
    let plaintext = record.length >= TAG_LENGTH ? this.receiveKey.decryptWithAd(EMPTY, record, out) : null;
    if (plaintext === null && this.nextReceive !== null) {
      plaintext = this.nextReceive.key.decryptWithAd(EMPTY, record);
      if (plaintext !== null) this.confirmNextReceive();
    }
    if (plaintext === null || plaintext.length === 0) {
      this.destroy(protocolError('a record from the peer failed authentication: the connection was altered in transit'));
      return;
    }
    this.lastReceivedAt = Date.now();
    switch (plaintext[0]) {
      case DATA:
        this.deliver(plaintext.subarray(1));
        break;
      case REKEY_INIT:
        this.onRekeyInit(plaintext.subarray(1));
        break;
      case REKEY_RESPONSE:
        this.onRekeyResponse(plaintext.subarray(1));
        break;
      case CLOSE:
        this.onPeerClose();
        break;
      default:
        break; // an internal type from a later version: nothing to do
    }
    this.rekeyIfWornOut();
  }

  onDrain(): void {
    if (this.state !== 'open') return;
    if (this.handlers === null) this.drainPending = true;
    else this.handlers.drain();
  }

  onLinkClose(err?: Error): void {
    const wasOpen = this.state === 'open';
    this.state = 'closed';
    this.clearTimers();
    // Without a CLOSE record the peer did not mean to stop (crash, network, or truncation).
    if (wasOpen && err === undefined) err = errorWithoutStack('the connection closed without a close record from the peer');
    this.finish(wasOpen ? err : undefined);
  }

  // --- internals

  private closeDelivered = false;

  private finish(err?: Error): void {
    if (this.closeResult !== null) return;
    this.closeResult = err === undefined ? {} : { err };
    this.clearTimers();
    if (this.handlers !== null) this.deliverClose();
  }

  private deliverClose(): void {
    if (this.closeDelivered) return;
    this.closeDelivered = true;
    try {
      this.handlers!.close(this.closeResult!.err);
    } catch (err) {
      this.log.error('session close handler threw', { error: err instanceof Error ? err.message : String(err) });
    }
  }

  private deliver(payload: Buffer): void {
    const handlers = this.handlers;
    if (handlers === null) {
      this.queued.push(payload);
      this.queuedBytes += payload.length;
      if (this.queuedBytes > PRESTART_QUEUE_LIMIT) {
        this.destroy(protocolError('the peer sent more than 1 MiB before the session was started'));
      }
      return;
    }
    try {
      handlers.message(payload);
    } catch (err) {
      // A bug in the consumer must not take the process down from inside a socket callback.
      this.log.error('session message handler threw', { error: err instanceof Error ? err.message : String(err) });
      this.destroy(err instanceof Error ? err : new Error(String(err)));
    }
  }

  /** Encrypts one record, or destroys the session and returns null when the key is exhausted. */
  private seal(type: number, body: Uint8Array): Buffer | null {
    const length = body.length + 1;
    if (this.scratch.length < length) this.scratch = Buffer.allocUnsafe(Math.max(length, Math.min(this.maxPayload + 1, 2 * length)));
    const plaintext = this.scratch.subarray(0, length);
    plaintext[0] = type;
    plaintext.set(body, 1);
    return this.sealed(plaintext);
  }

  /** Encrypts (type || body); `out` as in CipherState.encryptWithAd. Null: the session is over (see seal). */
  private sealed(plaintext: Buffer, out?: Buffer): Buffer | null {
    try {
      return this.sendKey.encryptWithAd(EMPTY, plaintext, out);
    } catch (err) {
      if (err instanceof NoiseError) {
        // Out of counters: what was sent is valid, so flush it rather than drop it, then close.
        this.state = 'closed';
        this.clearTimers();
        this.finish(protocolError('the session ran out of record counters before a rekey', err));
        this.link.close();
      } else {
        this.destroy(protocolError('the cipher failed to encrypt a record', err));
      }
      return null;
    }
  }

  /** Client: rekey long before the counters run out. Called after a record is handed to the link, never between seal and send. */
  private rekeyIfWornOut(): void {
    if (this.side === 'client' && (this.sendKey.counter >= REKEY_AFTER_RECORDS || this.receiveKey.counter >= REKEY_AFTER_RECORDS)) {
      this.startRekey();
    }
  }

  /** Internal records ignore backpressure: they are small and must go out. */
  private sendInternal(type: number, body: Buffer): void {
    const record = this.seal(type, body);
    if (record === null) return;
    this.bytesOut += record.length;
    this.link.send(record);
  }

  private onPeerClose(): void {
    this.state = 'closed';
    this.clearTimers();
    this.finish();
    this.link.close();
  }

  private confirmNextReceive(): void {
    this.receiveKey = this.nextReceive!.key;
    this.receiveBornAt = this.nextReceive!.bornAt;
    this.nextReceive = null;
    this.scheduleTimers();
  }

  // --- rekey

  private startRekey(): void {
    if (this.pendingRekey !== null || this.state !== 'open' || this.role.newInitiator === undefined) return;
    try {
      const hs = this.role.newInitiator();
      const message1 = writeInitiation(hs, {});
      this.pendingRekey = hs;
      this.sendInternal(REKEY_INIT, message1);
      this.log.debug('rekey started');
    } catch (err) {
      this.destroy(protocolError('could not start a rekey handshake', err));
    }
  }

  private onRekeyInit(message1: Buffer): void {
    if (this.role.answer === undefined) {
      this.destroy(protocolError('the server sent a rekey initiation'));
      return;
    }
    if (this.nextReceive !== null) {
      this.destroy(protocolError('the client started a rekey before using the previous one'));
      return;
    }
    let answer: { message2: Buffer; keys: TransportKeys };
    try {
      answer = this.role.answer(message1);
    } catch (err) {
      this.destroy(err instanceof DshieldError ? err : protocolError('rekey handshake failed', err));
      return;
    }
    // The answer goes out under the old key; everything after it under the new one.
    this.sendInternal(REKEY_RESPONSE, answer.message2);
    if (this.state !== 'open') return;
    const now = Date.now();
    this.sendKey = answer.keys.send;
    this.sendBornAt = now;
    this.nextReceive = { key: answer.keys.receive, bornAt: now };
    this.rekeyed();
  }

  private onRekeyResponse(message2: Buffer): void {
    const hs = this.pendingRekey;
    if (hs === null) {
      this.destroy(protocolError('the server sent an unrequested rekey response'));
      return;
    }
    this.pendingRekey = null;
    let keys: TransportKeys;
    try {
      hs.readMessage(message2);
      keys = hs.split();
    } catch (err) {
      this.destroy(protocolError('the server\'s rekey response failed to authenticate', err));
      return;
    }
    // The server switched right after its response; the stream is ordered, so switch both now.
    const now = Date.now();
    this.sendKey = keys.send;
    this.receiveKey = keys.receive;
    this.sendBornAt = now;
    this.receiveBornAt = now;
    this.rekeyed();
  }

  private rekeyed(): void {
    this.rekeys++;
    this.scheduleTimers();
    this.log.debug('rekeyed', { side: this.side, client: this.peer?.name, rekeys: this.rekeys });
    try {
      this.handlers?.rekey?.();
    } catch (err) {
      this.log.error('session rekey handler threw', { error: err instanceof Error ? err.message : String(err) });
    }
  }

  // --- timers

  private clearTimers(): void {
    if (this.rekeyTimer !== null) clearTimeout(this.rekeyTimer);
    if (this.rejectTimer !== null) clearTimeout(this.rejectTimer);
    this.rekeyTimer = null;
    this.rejectTimer = null;
  }

  private scheduleTimers(): void {
    this.clearTimers();
    if (this.state !== 'open') return;
    const now = Date.now();
    if (this.role.newInitiator !== undefined && this.pendingRekey === null) {
      this.rekeyTimer = setTimeout(() => this.startRekey(), Math.max(0, this.sendBornAt + this.rekeyAfterMs - now));
      this.rekeyTimer.unref();
    }
    const oldest = Math.min(this.sendBornAt, this.receiveBornAt);
    this.rejectTimer = setTimeout(() => this.onKeysExpired(), Math.max(0, oldest + this.rejectAfterMs - now));
    this.rejectTimer.unref();
  }

  private onKeysExpired(): void {
    this.rejectTimer = null;
    if (this.state !== 'open') return;
    const now = Date.now();
    if (now - this.receiveBornAt >= this.rejectAfterMs && this.nextReceive !== null) {
      // The client never used the new keys, but it has them: the old ones expire now.
      this.confirmNextReceive();
      return;
    }
    this.destroy(
      protocolError(`the session keys are older than ${this.rejectAfterMs} ms and no rekey completed: closing the session`),
    );
  }
}

// ---------------------------------------------------------------------------
// Handshake helpers

function rejectAfter(opts: { rejectAfterMs?: number }): number {
  return opts.rejectAfterMs ?? DEFAULT_REJECT_AFTER_MS;
}

// ---------------------------------------------------------------------------
// Client

/**
 * Run the handshake as the client over `link` (fresh, not started). Resolves
 * with the session; rejects with DshieldError HANDSHAKE_TIMEOUT (no answer in
 * time, or the link closed first), SERVER_KEY_MISMATCH (an answer that fails
 * to authenticate), PROTOCOL (an authentic answer that is malformed),
 * UNSUPPORTED (a datagram link) or KEY (bad local keys). Closes the link on failure.
 */
export function connectSession(link: Link, opts: ClientHandshakeOptions): Promise<Session> {
  return new Promise<Session>((resolve, reject) => {
    if (link.type !== 'stream') {
      link.destroy();
      reject(new DshieldError(ErrorCodes.UNSUPPORTED, 'sessions over datagram transports are not supported yet; use a stream transport (tcp or ws)'));
      return;
    }
    const pattern: HandshakePattern = opts.psk !== undefined ? 'IKpsk2' : 'IK';
    let newInitiator: () => HandshakeState;
    let handshake: HandshakeState;
    let message1: Buffer;
    try {
      newInitiator = initiatorFactory(opts);
      handshake = newInitiator();
      message1 = writeInitiation(handshake, opts.payload ?? {});
    } catch (err) {
      link.destroy();
      reject(new DshieldError(ErrorCodes.KEY, `cannot start the handshake: ${err instanceof Error ? err.message : String(err)}`, { cause: err }));
      return;
    }
    if (message1.length > link.maxRecordSize) {
      link.destroy();
      reject(new DshieldError(ErrorCodes.INTERNAL, 'the handshake payload is too large for one record'));
      return;
    }

    let session: SecureSession | null = null;
    let settled = false;
    let bytesIn = 0;
    const timeoutMs = opts.handshakeTimeoutMs;
    const fail = (err: DshieldError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      link.destroy();
      opts.log.debug('handshake failed', { code: err.code, remote: link.remoteAddress });
      reject(err);
    };
    const timer = setTimeout(() => {
      fail(new DshieldError(ErrorCodes.HANDSHAKE_TIMEOUT, `the server did not answer the handshake within ${timeoutMs} ms: ${TIMEOUT_ADVICE}`));
    }, timeoutMs);

    link.start({
      record(record) {
        if (session !== null) {
          session.onRecord(record);
          return;
        }
        if (settled) return;
        bytesIn += record.length;
        let params: Record<string, unknown>;
        try {
          params = readResponse(handshake, record);
        } catch (err) {
          fail(err as DshieldError);
          return;
        }
        settled = true;
        clearTimeout(timer);
        session = new SecureSession({
          side: 'client',
          link,
          keys: handshake.split(),
          params,
          log: opts.log,
          rekeyAfterMs: opts.rekeyAfterMs ?? DEFAULT_REKEY_AFTER_MS,
          rejectAfterMs: rejectAfter(opts),
          role: { newInitiator },
          bytesIn,
          bytesOut: message1.length,
        });
        opts.log.debug('handshake complete', { remote: link.remoteAddress, pattern });
        resolve(session);
      },
      drain() {
        session?.onDrain();
      },
      close(err) {
        if (session !== null) {
          session.onLinkClose(err);
          return;
        }
        fail(
          new DshieldError(ErrorCodes.HANDSHAKE_TIMEOUT, `the server closed the connection without answering the handshake: ${TIMEOUT_ADVICE}`, {
            cause: err,
          }),
        );
      },
    });
    link.send(message1);
  });
}

// ---------------------------------------------------------------------------
// Server

/**
 * Run the handshake as the server over `link` (fresh, not started). Calls
 * opts.onSession once the client is authenticated and answered; otherwise
 * stays silent, discards whatever arrives until handshakeTimeoutMs after this
 * call, destroys the link and calls opts.onRefused once. Never throws.
 */
export function acceptSession(link: Link, opts: ServerAcceptOptions): void {
  if (link.type !== 'stream') {
    link.destroy();
    new ServerHandshake(link, opts).refuse('datagram links are not supported yet');
    return;
  }
  link.start(new ServerHandshake(link, opts).armed());
}

/**
 * acceptSession's state for one link, and the link's handlers until and
 * after the handshake. A class, not closures: tsx names every closure bound
 * to a name (a defineProperty each), and a server makes these per handshake.
 */
class ServerHandshake implements LinkHandlers {
  private phase: 'waiting' | 'silenced' | 'up' | 'gone' = 'waiting';
  private session: SecureSession | null = null;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly link: Link,
    private readonly opts: ServerAcceptOptions,
  ) {}

  /** Starts the handshake timeout; returns this, the link's handlers. */
  armed(): this {
    this.timer = setTimeout(() => this.onTimeout(), this.opts.handshakeTimeoutMs);
    return this;
  }

  refuse(reason: string): void {
    this.phase = 'silenced';
    this.opts.log.debug('handshake refused', { remote: this.link.remoteAddress, reason });
    try {
      this.opts.onRefused(reason, this.link.remoteAddress);
    } catch (err) {
      this.opts.log.error('onRefused threw', { error: err instanceof Error ? err.message : String(err) });
    }
  }

  private onTimeout(): void {
    if (this.phase === 'waiting') this.refuse('timeout');
    if (this.phase === 'silenced') {
      this.phase = 'gone';
      this.link.destroy();
    }
  }

  record(record: Buffer): void {
    if (this.phase === 'up') {
      this.session!.onRecord(record);
      return;
    }
    if (this.phase !== 'waiting') return; // silenced: read and discard, keep nothing
    try {
      this.answer(record);
    } catch (err) {
      // A bug (in a plugin or here) must not crash the server or reveal anything to the peer.
      const message = err instanceof Error ? err.message : String(err);
      if (this.phase === 'waiting') {
        this.refuse(`internal error: ${message}`);
      } else {
        // onSession threw: nobody owns the session, so it must not linger.
        this.opts.log.error('session setup failed', { error: message });
        this.session?.destroy(err instanceof Error ? err : new Error(message));
      }
    }
  }

  drain(): void {
    this.session?.onDrain();
  }

  close(err?: Error): void {
    if (this.phase === 'up') {
      this.session!.onLinkClose(err);
      return;
    }
    this.phase = 'gone';
    clearTimeout(this.timer);
  }

  private answer(record: Buffer): void {
    // The options are the responder's context as they are: a server shares one object across its connections.
    const { link, opts } = this;
    const ctx: ResponderContext = opts;
    const init = checkInitiation(ctx, record);
    if (!init.ok) {
      this.refuse(init.reason);
      return;
    }
    let response: Record<string, unknown>;
    let message2: Buffer;
    try {
      response = opts.respond(init.identity, init.json);
      message2 = init.state.writeMessage(jsonBytes(response));
    } catch (err) {
      this.refuse(`refused: ${err instanceof Error ? err.message : String(err)}`);
      return;
    }
    if (message2.length > link.maxRecordSize) {
      this.refuse('refused: the response parameters do not fit in one record');
      return;
    }
    const keys = init.state.split();
    const clientKey = init.clientKey;
    this.phase = 'up';
    clearTimeout(this.timer);
    link.send(message2);
    const session = new SecureSession({
      side: 'server',
      link,
      keys,
      peer: init.identity,
      params: init.json,
      log: opts.log,
      rekeyAfterMs: opts.rekeyAfterMs ?? DEFAULT_REKEY_AFTER_MS,
      rejectAfterMs: rejectAfter(opts),
      role: {
        answer(rekeyMessage1) {
          const again = checkInitiation(ctx, rekeyMessage1, clientKey);
          if (!again.ok) throw protocolError(`rekey refused: ${again.reason}`);
          return { message2: again.state.writeMessage(jsonBytes({})), keys: again.state.split() };
        },
      },
      bytesIn: record.length,
      bytesOut: message2.length,
    });
    this.session = session;
    opts.log.debug('handshake complete', { remote: link.remoteAddress, client: init.identity.name, pattern: init.state.pattern });
    opts.onSession(session);
  }
}
