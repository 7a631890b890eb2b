/**
 * transport "ws": records over a WebSocket, one binary message per record
 * (no compression), so the tunnel looks like a web app and passes through
 * HTTP reverse proxies and CDNs that speak WebSocket.
 *
 * Server: listen("host:port") serves HTTP (or HTTPS with tlsCert/tlsKey).
 * A WebSocket upgrade on `path` becomes a Link. Every other request, and a
 * malformed upgrade on `path`, gets the same plain "404 Not Found": the
 * server is a boring web server with nothing to say about itself.
 *
 * Client: dial("ws://host:port/path" | "wss://host:port/path" | "host:port");
 * "host:port", or a URL without a path, uses the configured `path`.
 *
 * Behind a reverse proxy the server sees the proxy's address; a Link's
 * remoteAddress is then the first address of X-Forwarded-For (the original
 * client as the first proxy saw it), with port 0 when the header has none.
 * The header is taken as given: a client that reaches the server directly can
 * forge it. It is used for logs only, never for a decision.
 *
 * The protocol is our own few parts: the upgrade (core/ws-handshake.ts),
 * frames in (core/ws-reader.ts, a state machine) and frames out (here).
 * Why not the ws library, which this transport used before: it reads every
 * chunk into fresh memory and copies each 64 KiB record, which spans two
 * of Node's reads, into a buffer of its own. A client over ws:// now reads
 * as the tcp transport does, straight into record memory sized from the
 * frame headers (net.Socket's `onread`): measured in the bench topology,
 * see the README's "How it works". A server's upgraded socket reads 'data'
 * events, copied into the same memory, until it carries bulk frames; then
 * it is made again to read in place (WsLink.readInPlace; not under TLS).
 *
 * Receiving: a whole binary message is a record. Pings are answered with
 * pongs; text messages are dropped; a message in fragments is put together;
 * anything that breaks RFC 6455 (an unmasked frame from a client, a masked
 * one from a server, reserved bits, unknown opcodes, a message of more than
 * 65535 bytes...) closes the link with code 1002 or 1009. Before start()
 * nothing is read past the upgrade, so nothing waits in memory.
 *
 * Closing: close() sends a close frame (1000) after what is queued and
 * half-closes the socket; the peer answers with its own close frame and
 * closes the connection. A close frame from the peer is answered the same
 * way. A peer that does neither within CLOSE_GRACE_MS is cut off.
 *
 * Backpressure: send() says false once the socket holds 256 KiB it has not
 * handed to the kernel; the socket's 'drain' is then handlers.drain().
 *
 * Sending in place: the session seals each bulk record with `headroom`
 * bytes free before it (8 on a client, 4 on a server); sendInPlace writes
 * the frame header there, masks the record in place and hands the socket
 * one buffer: no copy. send() and sendBatch() copy into one buffer.
 *
 * Client masking: RFC 6455 has the client XOR every frame with a random
 * 4-byte key (and the server XOR it back). core/ws-mask.ts does that in C
 * with bufferutil (an optional dependency with prebuilt binaries: no
 * install script runs), and in plain JavaScript where that cannot load,
 * which costs ~5x throughput client -> server on loopback (~170 vs ~800
 * MB/s for 16 KiB records). The masking exists so a script cannot put
 * chosen bytes on the wire for a confused proxy cache; our payloads are
 * ciphertext, so that attack does not apply. Option `zeroMask: true` uses
 * the all-zero key, which costs nothing to apply. It is off by default
 * because the zero key is visible (a fingerprint) to anyone who can read
 * plain ws:// traffic; under wss:// (or TLS up to a proxy) nobody on the
 * path sees it.
 *
 * A record larger than 65535 bytes is a caller's bug: send/sendInPlace/sendBatch throw a
 * RangeError (and send nothing).
 */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net, { isIP, type Socket } from 'node:net';
import { resolve as resolvePath } from 'node:path';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { definePlugin } from '../core/define.ts';
import { abortError, describeDialError, describeListenError, errnoOf } from '../core/net-errors.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { formatHostPort, formatPeer, parseHostPort } from '../core/hostport.ts';
import type { Link, LinkHandlers, Logger, TransportListener, TransportPlugin } from '../core/types.ts';
import { BulkReads, onreadInto } from '../core/reopen-socket.ts';
import { checkUpgradeAnswer, newClientKey, upgradeKeyOf, upgradeRequest, upgradeResponse } from '../core/ws-handshake.ts';
import { maskInPlace, writeMaskKey } from '../core/ws-mask.ts';
import {
  CLOSE_NORMAL,
  OP_BINARY,
  OP_CLOSE,
  OP_PING,
  OP_PONG,
  WsFrameReader,
  frameHeaderLength,
  writeFrameHeader,
  type WsReaderEvents,
} from '../core/ws-reader.ts';

const MAX_RECORD = 0xffff;
/**
 * send() returns false once this many bytes wait in user space. 64 KiB and
 * 1 MiB measured the same on loopback (the kernel's buffers dominate); this
 * leaves room for a batch of 16 KiB records while bounding memory per link.
 */
const HIGH_WATER = 256 * 1024;
/**
 * close() sends what is queued, then the close frame, and waits for the peer's;
 * a peer that takes longer than this (not reading, or gone) is cut off.
 */
const CLOSE_GRACE_MS = 30_000;
/** sendBatch() copies a batch into one buffer up to this total; beyond it, one buffer per record in one writev (as the tcp transport). */
const BATCH_CONCAT_MAX = 64 * 1024;

function checkSize(record: Buffer): void {
  if (record.length > MAX_RECORD) {
    throw new RangeError(`ws transport: a record of ${record.length} bytes exceeds the maximum of ${MAX_RECORD}`);
  }
}

/**
 * How this side masks the frames it writes: a client must mask (RFC 6455
 * section 5.3), with a random key or, with the option zeroMask, the
 * all-zero one; a server must not.
 */
type Masking = 'random' | 'zero' | 'none';

const ZERO_KEY = Buffer.alloc(4);

/**
 * How the link's reader is fed: the socket reads into it itself (`onread`,
 * set up by dial), 'data' events the dialer already forwards (TLS), or
 * 'data' events the link forwards from start() (an accepted socket).
 */
type Feeding = 'onread' | 'dialer' | 'link';

class WsLink implements Link, WsReaderEvents {
  readonly type = 'stream' as const;
  readonly maxRecordSize = MAX_RECORD;
  /** The longest header a record of at most 65535 bytes needs: 2 bytes, a 16-bit length, and the key when masked. */
  readonly headroom: number;
  /** Frames this side writes carry a mask key (a client's). */
  private readonly masked: boolean;
  private handlers: LinkHandlers | undefined;
  /** 'open' -> 'closing' (a close frame sent or received, or destroy()) -> 'closed' (the socket is gone). */
  private state: 'open' | 'closing' | 'closed' = 'open';
  private error: Error | undefined;
  private closeDelivered = false;
  private closeSent = false;
  private needDrain = false;
  private graceTimer: NodeJS.Timeout | undefined;
  /** The socket's 'data' goes to the reader (feeding 'link'). */
  private fed = false;
  readonly reader: WsFrameReader;
  /** An accepted socket's reads, until they show bulk frames (see readInPlace). */
  private readonly bulk: BulkReads;

  /**
   * `reader`: the dialer's (it read the server's answer); an accepted
   * socket gets one here, fed with `early` (what the HTTP server read past
   * the request) and then the socket's 'data' from start().
   */
  constructor(
    private socket: Socket,
    readonly remoteAddress: string,
    private readonly log: Logger,
    private readonly masking: Masking,
    private readonly feeding: Feeding,
    reader?: WsFrameReader,
    private readonly early: Buffer = Buffer.alloc(0),
  ) {
    this.masked = masking !== 'none';
    this.headroom = this.masked ? 8 : 4;
    this.reader = reader ?? new WsFrameReader(true, this);
    this.bulk = new BulkReads(socket);
    // Nothing is read past the upgrade until start(): frames already read wait in the reader.
    socket.pause();
    this.reader.hold();
    socket.setNoDelay(true);
    this.watch(socket);
  }

  /** The link's listeners on `socket`; they fall silent once the link has moved to another (readInPlace). */
  private watch(socket: Socket): void {
    socket.on('error', (err) => {
      if (socket !== this.socket) return;
      this.error ??= err;
      this.log.debug('link error', { remote: this.remoteAddress, error: err.message });
    });
    // The peer finished sending (after its close frame, or it just went away): so do we.
    // An HTTP server's sockets allow half-open connections, so this is not automatic.
    socket.on('end', () => {
      if (socket !== this.socket) return;
      this.reader.stop();
      if (this.state === 'open') this.state = 'closing';
      socket.end();
    });
    socket.on('close', () => {
      if (socket !== this.socket) return;
      this.state = 'closed';
      clearTimeout(this.graceTimer);
      this.reader.stop();
      if (this.handlers) this.deliverClose();
    });
    socket.on('drain', () => {
      if (socket !== this.socket || !this.needDrain || this.state !== 'open' || !this.handlers) return;
      this.needDrain = false;
      try {
        this.handlers.drain();
      } catch (err) {
        this.fail(err);
      }
    });
  }

  get bufferedAmount(): number {
    return this.socket.writableLength;
  }

  start(handlers: LinkHandlers): void {
    if (this.handlers) throw new Error('ws transport: link.start() called twice');
    this.handlers = handlers;
    // Deliver on the next tick, never from inside start().
    process.nextTick(() => {
      if (this.state === 'closed') {
        this.deliverClose();
        return;
      }
      this.readOn();
    });
  }

  /** Deliver what waited and read on: from start(), or to discard until the peer closes. */
  private readOn(): void {
    this.reader.release();
    if (this.feeding === 'link' && !this.fed) {
      this.fed = true;
      if (this.early.length > 0) this.reader.push(this.early);
      const socket = this.socket;
      socket.on('data', (chunk: Buffer) => {
        if (socket !== this.socket) return;
        this.reader.push(chunk);
        if (this.bulk.due(chunk.length) && this.state === 'open' && !this.reader.stopped) this.readInPlace();
      });
    }
    this.socket.resume();
  }

  /**
   * An accepted socket reads 'data' events into fresh memory, each chunk
   * then copied into the reader's (Node offers `onread` only for sockets it
   * makes). Once the link carries bulk frames (an upload through the
   * server: BulkReads), the socket is made again over the same connection
   * to read straight into the reader's memory, as a dialed one does
   * (core/reopen-socket.ts). The reader's state is the same either way.
   * Where that cannot be done the link goes on with 'data' events.
   */
  private readInPlace(): void {
    const socket = this.bulk.reopen(this.socket, this.reader);
    if (socket === null) return;
    this.socket = socket;
    this.watch(socket);
    socket.resume();
  }

  // --- frames in (WsReaderEvents) ---

  message(data: Buffer): void {
    // After close(): read on to the peer's close frame, discarding.
    if (this.state !== 'open') return;
    try {
      this.handlers!.record(data);
    } catch (err) {
      this.fail(err);
    }
  }

  control(opcode: number, payload: Buffer): void {
    if (opcode === OP_PING) {
      // A peer that pings without reading gets no more pongs than the write buffer's mark: memory stays bounded.
      if (!this.closeSent && this.socket.writable && this.socket.writableLength < HIGH_WATER) this.socket.write(this.frame(OP_PONG, payload));
      return;
    }
    if (opcode !== OP_CLOSE) return; // a pong: nothing to do
    // The peer is done: answer with its code (or 1000), stop reading, let the connection end.
    this.reader.stop();
    const code = payload.length >= 2 ? payload.readUInt16BE(0) : CLOSE_NORMAL;
    this.sendClose(validCloseCode(code) ? code : CLOSE_NORMAL);
    this.finish();
  }

  violation(code: number, why: string): void {
    this.log.debug('closing a link: the peer broke the WebSocket protocol', { remote: this.remoteAddress, error: why });
    this.error ??= new Error(`the peer broke the WebSocket protocol: ${why}`);
    this.sendClose(code);
    this.finish();
  }

  // --- frames out ---

  send(record: Buffer): boolean {
    checkSize(record);
    if (this.state !== 'open' || !this.socket.writable) return false;
    this.socket.write(this.frame(OP_BINARY, record));
    return this.belowHighWater();
  }

  /** Frames the record in the memory before it and masks it in place, then writes it with one call and no copy. */
  sendInPlace(record: Buffer): boolean {
    checkSize(record);
    if (this.state !== 'open' || !this.socket.writable) return false;
    const length = record.length;
    const head = frameHeaderLength(length, this.masked);
    const at = record.byteOffset - head;
    const frame = Buffer.from(record.buffer, at, head + length);
    this.writeHeader(frame, 0, OP_BINARY, record);
    this.socket.write(frame);
    return this.belowHighWater();
  }

  sendBatch(records: Buffer[]): boolean {
    let total = 0;
    for (const r of records) {
      checkSize(r);
      total += frameHeaderLength(r.length, this.masked) + r.length;
    }
    if (this.state !== 'open' || !this.socket.writable) return false;
    if (records.length === 0) return this.belowHighWater();
    if (total <= BATCH_CONCAT_MAX) {
      const out = Buffer.allocUnsafe(total);
      let at = 0;
      for (const r of records) at = this.writeFrameAt(out, at, OP_BINARY, r);
      this.socket.write(out);
    } else {
      this.socket.cork();
      for (const r of records) this.socket.write(this.frame(OP_BINARY, r));
      this.socket.uncork();
    }
    return this.belowHighWater();
  }

  close(): void {
    if (this.state !== 'open') return;
    this.sendClose(CLOSE_NORMAL);
    this.finish();
    // Read on (discarding) until the peer closes, so the close completes cleanly.
    this.readOn();
  }

  destroy(): void {
    if (this.state === 'closed') return;
    this.state = 'closing';
    this.socket.destroy();
  }

  /** One frame of `payload` in fresh memory (masked on a client). */
  private frame(opcode: number, payload: Buffer): Buffer {
    const out = Buffer.allocUnsafe(frameHeaderLength(payload.length, this.masked) + payload.length);
    this.writeFrameAt(out, 0, opcode, payload);
    return out;
  }

  /** Write a frame of `payload` (copied) at `at` of `out`; returns where it ends. */
  private writeFrameAt(out: Buffer, at: number, opcode: number, payload: Buffer): number {
    const head = frameHeaderLength(payload.length, this.masked);
    const body = out.subarray(at + head, at + head + payload.length);
    payload.copy(body);
    this.writeHeader(out, at, opcode, body);
    return at + head + payload.length;
  }

  /** Write the header before `body` (which starts where the header ends) and mask `body` in place on a client. */
  private writeHeader(out: Buffer, at: number, opcode: number, body: Buffer): void {
    const n = writeFrameHeader(out, at, opcode, body.length, this.masked ? ZERO_KEY : null);
    if (this.masking !== 'random') return;
    const key = out.subarray(at + n - 4, at + n);
    writeMaskKey(key);
    maskInPlace(body, key);
  }

  private sendClose(code: number): void {
    if (this.closeSent) return;
    this.closeSent = true;
    if (!this.socket.writable) return;
    const payload = Buffer.allocUnsafe(2);
    payload.writeUInt16BE(code, 0);
    this.socket.write(this.frame(OP_CLOSE, payload));
  }

  /** After a close frame went out: flush, half-close, and give the peer CLOSE_GRACE_MS to close the connection. */
  private finish(): void {
    if (this.state === 'open') this.state = 'closing';
    if (this.graceTimer !== undefined || this.state === 'closed') return;
    this.socket.end();
    this.graceTimer = setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  private belowHighWater(): boolean {
    if (this.socket.writableLength < HIGH_WATER) return true;
    this.needDrain = true;
    return false;
  }

  /** A handler threw (a bug upstream): close, don't crash. */
  private fail(err: unknown): void {
    const e = err instanceof Error ? err : new Error(String(err));
    this.log.error('a link handler threw; closing the link', { remote: this.remoteAddress, error: e.message });
    this.error ??= e;
    this.state = 'closing';
    this.reader.stop();
    this.socket.destroy();
  }

  private deliverClose(): void {
    if (this.closeDelivered) return;
    this.closeDelivered = true;
    try {
      this.handlers!.close(this.error);
    } catch (err) {
      this.log.error('a link close handler threw', { remote: this.remoteAddress, error: (err as Error).message });
    }
  }
}

/** Close codes a peer may send (RFC 6455 section 7.4): 1000-1003, 1007-1014, and 3000-4999. */
function validCloseCode(code: number): boolean {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

/** The peer as logs should show it: X-Forwarded-For's first entry if usable, else the socket's peer. */
function peerOf(req: http.IncomingMessage, socket: Duplex): string {
  const header = req.headers['x-forwarded-for'];
  const first = (Array.isArray(header) ? header[0] : header)?.split(',')[0]?.trim();
  if (first) {
    if (isIP(first)) return formatPeer(first, 0);
    try {
      const { host, port } = parseHostPort(first, 'X-Forwarded-For');
      if (isIP(host)) return formatPeer(host, port);
    } catch {
      // Not an address: ignore the header.
    }
  }
  const s = socket as Socket;
  return formatPeer(s.remoteAddress, s.remotePort);
}

const NOT_FOUND_BODY = 'Not Found';

function respondNotFound(res: http.ServerResponse): void {
  res.writeHead(404, { 'Content-Type': 'text/plain', 'Content-Length': NOT_FOUND_BODY.length });
  res.end(NOT_FOUND_BODY);
}

/** The same answer as respondNotFound, written on a raw upgrade socket, then the socket is closed. */
function rejectUpgrade(socket: Duplex): void {
  socket.on('error', () => {});
  if (!socket.writable) {
    socket.destroy();
    return;
  }
  socket.end(
    'HTTP/1.1 404 Not Found\r\n' +
      `Date: ${new Date().toUTCString()}\r\n` +
      'Content-Type: text/plain\r\n' +
      `Content-Length: ${NOT_FOUND_BODY.length}\r\n` +
      'Connection: close\r\n\r\n' +
      NOT_FOUND_BODY,
  );
  socket.once('finish', () => socket.destroy());
}

function pathOf(url: string | undefined): string {
  if (!url) return '';
  const q = url.search(/[?#]/);
  return q < 0 ? url : url.slice(0, q);
}

const TLS_CODES = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'CERT_HAS_EXPIRED',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** As core/net-errors' describeDialError, plus the TLS failures only wss:// has. */
function describeWsDialError(err: NodeJS.ErrnoException, host: string): { reason: string; text: string } {
  const code = errnoOf(err);
  if (code && TLS_CODES.has(code)) {
    return {
      reason: 'tls',
      text: `its TLS certificate was not accepted (${code}); the pinned server key authenticates the server, so the ws option rejectUnauthorized: false is safe with a self-signed certificate`,
    };
  }
  return describeDialError(err, host);
}

export interface WsOptions {
  path: string;
  connectTimeout: number;
  tlsCert?: string;
  tlsKey?: string;
  rejectUnauthorized: boolean;
  zeroMask: boolean;
}

const positive = (v: unknown) => (Number.isFinite(v) && (v as number) > 0 ? undefined : 'must be a positive number');

export default definePlugin<'transport', WsOptions>({
  kind: 'transport',
  name: 'ws',
  description: 'records over a WebSocket (one binary message each); works behind HTTP reverse proxies',
  options: {
    path: {
      type: 'string',
      description: 'the URL path the server accepts WebSocket upgrades on (pick something unguessable)',
      default: '/dshield',
      validate: (v) => (typeof v === 'string' && /^\/[^\s?#]*$/.test(v) ? undefined : 'must start with "/" and have no spaces, "?" or "#"'),
    },
    connectTimeout: {
      type: 'number',
      description: 'milliseconds the client waits for the connection and the WebSocket upgrade',
      default: 10_000,
      validate: positive,
    },
    tlsCert: {
      type: 'string',
      description: 'server: path to a PEM certificate (chain) to serve wss:// directly; needs tlsKey',
    },
    tlsKey: {
      type: 'string',
      description: 'server: path to the PEM private key for tlsCert',
    },
    rejectUnauthorized: {
      type: 'boolean',
      description: 'client, wss://: refuse a certificate that does not verify (the pinned server key authenticates anyway)',
      default: true,
    },
    zeroMask: {
      type: 'boolean',
      description: 'client: mask frames with the all-zero key (~5x faster uploads; a visible fingerprint on plain ws://)',
      default: false,
    },
  },
  create(options, ctx): TransportPlugin {
    const path = options.path ?? '/dshield';
    const connectTimeout = options.connectTimeout ?? 10_000;
    const rejectUnauthorized = options.rejectUnauthorized ?? true;
    const zeroMask = options.zeroMask ?? false;
    const log = ctx.log;
    const listeners = new Set<TransportListener>();
    if (Boolean(options.tlsCert) !== Boolean(options.tlsKey)) {
      throw new DshieldError(ErrorCodes.CONFIG, 'ws transport: tlsCert and tlsKey go together; set both or neither');
    }

    const readPem = (file: string, what: string): Buffer => {
      const full = resolvePath(ctx.baseDir, file);
      try {
        return readFileSync(full);
      } catch (err) {
        throw new DshieldError(ErrorCodes.CONFIG, `ws transport: cannot read ${what} ${full}: ${(err as Error).message}`, {
          cause: err,
        });
      }
    };

    const listen = async (address: string, onLink: (link: Link) => void): Promise<TransportListener> => {
      const { host, port } = parseHostPort(address, 'ws listen address');
      const shown = formatHostPort(host, port);
      const server = options.tlsCert
        ? https.createServer({ cert: readPem(options.tlsCert, 'tlsCert'), key: readPem(options.tlsKey!, 'tlsKey') })
        : http.createServer();
      // Bounded patience for slow or idle HTTP clients.
      server.headersTimeout = 10_000;
      server.requestTimeout = 15_000;
      server.on('request', (_req, res) => respondNotFound(res));
      server.on('upgrade', (req: http.IncomingMessage, socket: Socket, head: Buffer) => {
        // A malformed upgrade on our path looks like any unknown URL.
        const key = pathOf(req.url) === path ? upgradeKeyOf(req) : undefined;
        if (key === undefined || !socket.writable) {
          rejectUpgrade(socket);
          return;
        }
        socket.write(upgradeResponse(key));
        const link = new WsLink(socket, peerOf(req, socket), log, 'none', 'link', undefined, head);
        try {
          onLink(link);
        } catch (err) {
          log.error('onLink threw; dropping the connection', { error: (err as Error).message });
          link.destroy();
        }
      });

      await new Promise<void>((resolve, reject) => {
        server.once('error', (err: NodeJS.ErrnoException) =>
          reject(
            new DshieldError(ErrorCodes.LISTEN, `cannot listen on ${shown}: ${describeListenError(err)}`, {
              cause: err,
              detail: { address: shown, code: err.code },
            }),
          ),
        );
        server.listen({ host, port }, () => resolve());
      });
      server.on('error', (err) => log.warn('ws listener error', { address: shown, error: err.message }));

      const bound = server.address() as { address: string; port: number };
      let closed: Promise<void> | undefined;
      const listener: TransportListener = {
        address: formatHostPort(bound.address, bound.port),
        close() {
          closed ??= new Promise<void>((resolve) => {
            ctx.signal.removeEventListener('abort', onAbort);
            listeners.delete(listener);
            // Stops accepting at once and drops idle keep-alive HTTP connections;
            // upgraded sockets are links now and stay open.
            server.close();
            setImmediate(resolve);
          });
          return closed;
        },
      };
      const onAbort = () => void listener.close();
      ctx.signal.addEventListener('abort', onAbort, { once: true });
      listeners.add(listener);
      log.debug('listening', { address: listener.address, path, tls: Boolean(options.tlsCert) });
      return listener;
    };

    /** The URL to dial; "host:port" (or a URL without a path) gets the configured path. */
    const toUrl = (address: string): URL => {
      if (/^wss?:\/\//i.test(address)) {
        let url: URL;
        try {
          url = new URL(address);
        } catch {
          throw new DshieldError(ErrorCodes.CONFIG, `server address: ${JSON.stringify(address)} is not a valid ws:// or wss:// URL`);
        }
        if (url.pathname === '/' || url.pathname === '') url.pathname = path;
        return url;
      }
      if (/^[a-z][a-z0-9+.-]*:\/\//i.test(address)) {
        throw new DshieldError(
          ErrorCodes.CONFIG,
          `server address: ${JSON.stringify(address)}: the ws transport dials ws://, wss:// or host:port`,
        );
      }
      const { host, port } = parseHostPort(address, 'server address');
      return new URL(`ws://${formatHostPort(host, port)}${path}`);
    };

    const dial = (address: string, signal?: AbortSignal): Promise<Link> => {
      let url: URL;
      try {
        url = toUrl(address);
      } catch (err) {
        return Promise.reject(err);
      }
      const shown = url.href;
      const signals = signal ? [signal, ctx.signal] : [ctx.signal];
      const aborted = signals.find((s) => s.aborted);
      if (aborted) return Promise.reject(abortError(aborted));

      const secure = url.protocol === 'wss:';
      // WHATWG URLs keep IPv6 hosts in brackets; sockets want them bare.
      const host = url.hostname.replace(/^\[(.*)\]$/, '$1');
      const port = Number(url.port) || (secure ? 443 : 80);
      const key = newClientKey();

      return new Promise<Link>((resolve, reject) => {
        let settled = false;
        let link: WsLink | undefined;
        // Until the link exists the reader only reads the answer's head; frames after it wait in the reader.
        const events: WsReaderEvents = {
          head: (head) => onHead(head),
          message: (data) => link?.message(data),
          control: (opcode, payload) => link?.control(opcode, payload),
          violation: (code, why) => (link ? link.violation(code, why) : settle(unreachable('rejected', `the WebSocket server broke the protocol: ${why}`))),
        };
        const reader = new WsFrameReader(false, events, true);
        // ws:// reads straight into the reader's memory (onread), as the tcp transport does;
        // a TLS socket has no onread, so its decrypted chunks are pushed into the reader.
        const socket: Socket = secure
          ? tls.connect({ host, port, servername: isIP(host) ? undefined : host, rejectUnauthorized })
          : net.connect({
              host,
              port,
              onread: onreadInto(reader),
            });
        if (secure) socket.on('data', (chunk: Buffer) => reader.push(chunk));
        const unreachable = (reason: string, text: string, cause?: unknown) =>
          new DshieldError(ErrorCodes.UNREACHABLE, `cannot reach the server at ${shown}: ${text}`, {
            cause,
            detail: { reason, address: shown },
          });
        const settle = (err?: Error) => {
          if (settled) return;
          settled = true;
          clearTimeout(timer);
          for (const s of signals) s.removeEventListener('abort', onAbort);
          socket.removeListener('error', onError);
          socket.removeListener('close', onClose);
          if (err) {
            reader.stop();
            socket.destroy();
            reject(err);
          }
        };
        const onConnected = () => socket.write(upgradeRequest(url, key));
        const onHead = (head: string): boolean => {
          if (settled) return false;
          const answer = checkUpgradeAnswer(head, key);
          if (!answer.ok) {
            const why = answer.status >= 200 && answer.status !== 101 ? `${answer.why} (is the path ${url.pathname} right?)` : answer.why;
            settle(unreachable('rejected', why));
            return false;
          }
          // The link attaches its own error listener before ours is removed.
          link = new WsLink(socket, formatPeer(socket.remoteAddress, socket.remotePort), log, zeroMask ? 'zero' : 'random', secure ? 'dialer' : 'onread', reader);
          settle();
          resolve(link);
          return true;
        };
        const onError = (err: NodeJS.ErrnoException) => {
          const { reason, text } = describeWsDialError(err, url.hostname);
          settle(unreachable(reason, text, err));
        };
        const onClose = () => settle(unreachable('reset', 'the connection closed before the WebSocket upgrade'));
        const onAbort = function (this: AbortSignal) {
          settle(abortError(this));
        };
        const timer = setTimeout(
          () => settle(unreachable('timeout', `no WebSocket connection within ${connectTimeout} ms`)),
          connectTimeout,
        );
        for (const s of signals) s.addEventListener('abort', onAbort, { once: true });
        socket.once(secure ? 'secureConnect' : 'connect', onConnected);
        socket.on('error', onError);
        socket.on('close', onClose);
      });
    };

    return {
      name: 'ws',
      type: 'stream',
      listen,
      dial,
      async close() {
        await Promise.all([...listeners].map((l) => l.close()));
      },
    };
  },
});
