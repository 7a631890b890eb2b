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
 * Backpressure: ws.send() returns nothing, so send() answers
 * `bufferedAmount < 256 KiB` itself. After a false, the TCP (or TLS) socket under
 * the WebSocket emits 'drain' once its write buffer is empty (it was far above
 * the socket's own 16 KiB mark, so a 'drain' is always due); that becomes
 * handlers.drain(). We hold that socket through public API: the HTTP server's
 * 'upgrade' event on the server side, the 'upgrade' response on the client.
 *
 * Sending in place: the session seals each bulk record with `headroom`
 * bytes free before it (8 on a client, 4 on a server), and sendInPlace
 * writes the frame header there, masks the record in place and hands the
 * socket one buffer: no copy. Through ws.send() (send, sendBatch: records
 * the caller keeps) the header goes out as a buffer of its own, and a
 * client's ws copies every masked frame into fresh memory first.
 *
 * Client masking: RFC 6455 has the client XOR every frame with a random
 * 4-byte key (and the server XOR it back). Both ws and sendInPlace
 * (core/ws-mask.ts) do that in C with bufferutil, ws's optional native addon
 * (an optional dependency here, with prebuilt binaries: no install script
 * runs), and in plain JavaScript where that cannot load, which costs ~5x
 * throughput client -> server on loopback (~170 vs ~800 MB/s for 16 KiB
 * records). With bufferutil a 512 MiB SOCKS5 upload over ws measured
 * 178-208 MB/s against 114-121 without, same sitting.
 * The masking exists so a script cannot put chosen bytes on
 * the wire for a confused proxy cache; our payloads are ciphertext, so that
 * attack does not apply. Option `zeroMask: true` uses the all-zero key,
 * which ws and every peer skip. It is off by default because the zero key is
 * visible (a fingerprint) to anyone who can read plain ws:// traffic; under
 * wss:// (or TLS up to a proxy) nobody on the path sees it.
 *
 * A record larger than 65535 bytes is a caller's bug: send/sendInPlace/sendBatch throw a
 * RangeError (and send nothing). An incoming message larger than that makes ws
 * close the connection (1009); an incoming text message is dropped.
 */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { isIP, type Socket } from 'node:net';
import { resolve as resolvePath } from 'node:path';
import type { Duplex } from 'node:stream';
import WebSocket, { WebSocketServer, type RawData } from 'ws';
import { definePlugin } from '../core/define.ts';
import { abortError, describeDialError, describeListenError, errnoOf } from '../core/net-errors.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { formatHostPort, formatPeer, parseHostPort } from '../core/hostport.ts';
import type { Link, LinkHandlers, Logger, TransportListener, TransportPlugin } from '../core/types.ts';
import { maskInPlace, writeMaskKey } from '../core/ws-mask.ts';

const MAX_RECORD = 0xffff;
/**
 * send() returns false once this many bytes wait in user space. 64 KiB and
 * 1 MiB measured the same on loopback (the kernel's buffers dominate); this
 * leaves room for a batch of 16 KiB records while bounding memory per link.
 */
const HIGH_WATER = 256 * 1024;
/**
 * Records that arrive before start(). ws is paused from the moment a link
 * exists, so none do in practice; the bounded queue is there so that a change
 * inside ws can neither make us deliver before start() nor lose records.
 */
const MAX_PENDING_BYTES = 1024 * 1024;
/**
 * close() sends what is queued, then the close frame, and waits for the peer's;
 * a peer that takes longer than this (not reading, or gone) is cut off.
 */
const CLOSE_GRACE_MS = 30_000;
const SEND_OPTIONS = { binary: true, compress: false, fin: true } as const;
/** First header byte of a frame written by sendInPlace: FIN set, opcode 2 (binary). */
const FIN_BINARY = 0x82;
/** Second header byte's top bit: the payload is masked and a 4-byte key follows the length. */
const MASKED = 0x80;

function checkSize(record: Buffer): void {
  if (record.length > MAX_RECORD) {
    throw new RangeError(`ws transport: a record of ${record.length} bytes exceeds the maximum of ${MAX_RECORD}`);
  }
}

/**
 * How this side masks the frames it writes itself (sendInPlace): a client
 * must mask (RFC 6455 section 5.3), with a random key or, with the option
 * zeroMask, the all-zero one; a server must not.
 */
type Masking = 'random' | 'zero' | 'none';

class WsLink implements Link {
  readonly type = 'stream' as const;
  readonly maxRecordSize = MAX_RECORD;
  /** The longest header a record of at most 65535 bytes needs: 2 bytes, a 16-bit length, and the key when masked. */
  readonly headroom: number;
  private handlers: LinkHandlers | undefined;
  /** 'open' -> 'closing' (close()/destroy() called) -> 'closed' (the WebSocket is gone). */
  private state: 'open' | 'closing' | 'closed' = 'open';
  private error: Error | undefined;
  private closeDelivered = false;
  private needDrain = false;
  private pending: Buffer[] | null = [];
  private pendingBytes = 0;
  private graceTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ws: WebSocket,
    /** The socket ws writes to; its 'drain' is our drain. */
    private readonly socket: Duplex,
    readonly remoteAddress: string,
    private readonly log: Logger,
    private readonly masking: Masking,
  ) {
    this.headroom = masking === 'none' ? 4 : 8;
    ws.pause();
    ws.on('message', (data: RawData, isBinary: boolean) => {
      if (!isBinary || this.state !== 'open') return;
      const record = data as Buffer; // binaryType 'nodebuffer': always one Buffer
      if (this.pending) {
        this.pendingBytes += record.length;
        if (this.pendingBytes > MAX_PENDING_BYTES) this.fail(new Error('too much data before start()'));
        else this.pending.push(record);
        return;
      }
      try {
        this.handlers!.record(record);
      } catch (err) {
        this.fail(err);
      }
    });
    ws.on('error', (err) => {
      this.error ??= err;
      this.log.debug('link error', { remote: this.remoteAddress, error: err.message });
    });
    ws.on('close', () => {
      this.state = 'closed';
      clearTimeout(this.graceTimer);
      if (this.handlers && !this.pending) this.deliverClose();
    });
    socket.on('drain', () => {
      if (!this.needDrain || this.state !== 'open' || !this.handlers) return;
      this.needDrain = false;
      try {
        this.handlers.drain();
      } catch (err) {
        this.fail(err);
      }
    });
  }

  get bufferedAmount(): number {
    return this.ws.bufferedAmount;
  }

  start(handlers: LinkHandlers): void {
    if (this.handlers) throw new Error('ws transport: link.start() called twice');
    this.handlers = handlers;
    // Deliver on the next tick, never from inside start().
    process.nextTick(() => {
      const early = this.pending!;
      this.pending = null;
      try {
        for (const record of early) {
          if (this.state !== 'open') break;
          handlers.record(record);
        }
      } catch (err) {
        this.fail(err);
      }
      if (this.state === 'closed') this.deliverClose();
      else this.ws.resume();
    });
  }

  send(record: Buffer): boolean {
    checkSize(record);
    if (this.state !== 'open' || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(record, SEND_OPTIONS);
    return this.belowHighWater();
  }

  /**
   * Frames the record in the memory before it and masks it in place, then
   * writes it with one call and no copy (ws.send() would write the header
   * apart, and a client's ws copies every masked frame into fresh memory).
   * Writing to the socket beside ws keeps frames in order because ws, with
   * no compression and no Blob data (we use neither), writes each frame
   * synchronously when it is sent: nothing of ws's waits in a queue to be
   * overtaken.
   */
  sendInPlace(record: Buffer): boolean {
    checkSize(record);
    if (this.state !== 'open' || this.ws.readyState !== WebSocket.OPEN) return false;
    const length = record.length;
    const keyed = this.masking !== 'none';
    const head = (length > 125 ? 4 : 2) + (keyed ? 4 : 0);
    const frame = Buffer.from(record.buffer, record.byteOffset - head, head + length);
    frame[0] = FIN_BINARY;
    if (length > 125) {
      frame[1] = 126;
      frame.writeUInt16BE(length, 2);
    } else {
      frame[1] = length;
    }
    if (keyed) {
      frame[1] |= MASKED;
      if (this.masking === 'zero') {
        frame.fill(0, head - 4, head);
      } else {
        const key = frame.subarray(head - 4, head);
        writeMaskKey(key);
        maskInPlace(record, key);
      }
    }
    this.socket.write(frame);
    return this.belowHighWater();
  }

  sendBatch(records: Buffer[]): boolean {
    for (const r of records) checkSize(r);
    if (this.state !== 'open' || this.ws.readyState !== WebSocket.OPEN) return false;
    // ws writes each frame synchronously (no compression): corking the socket
    // turns the batch into one writev.
    this.socket.cork();
    for (const r of records) this.ws.send(r, SEND_OPTIONS);
    this.socket.uncork();
    return this.belowHighWater();
  }

  close(): void {
    if (this.state !== 'open') return;
    this.state = 'closing';
    // ws sends the close frame after what is queued and waits for the peer's,
    // which it can only see if it reads (what it reads now is discarded).
    this.ws.close(1000);
    this.ws.resume();
    this.graceTimer = setTimeout(() => this.ws.terminate(), CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  destroy(): void {
    if (this.state === 'closed') return;
    this.state = 'closing';
    this.ws.terminate();
  }

  private belowHighWater(): boolean {
    if (this.ws.bufferedAmount < HIGH_WATER) return true;
    this.needDrain = true;
    return false;
  }

  /** A handler threw (a bug upstream) or the peer misbehaved: close, don't crash. */
  private fail(err: unknown): void {
    const e = err instanceof Error ? err : new Error(String(err));
    this.log.warn('closing a link', { remote: this.remoteAddress, error: e.message });
    this.error ??= e;
    this.state = 'closing';
    this.ws.terminate();
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
      const wss = new WebSocketServer({
        noServer: true,
        perMessageDeflate: false,
        maxPayload: MAX_RECORD,
        clientTracking: false,
        skipUTF8Validation: true,
      });
      // A malformed upgrade on our path looks like any unknown URL.
      wss.on('wsClientError', (_err, socket) => rejectUpgrade(socket));

      server.on('request', (_req, res) => respondNotFound(res));
      server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
        if (pathOf(req.url) !== path) {
          rejectUpgrade(socket);
          return;
        }
        wss.handleUpgrade(req, socket, head, (ws) => {
          const link = new WsLink(ws, socket, peerOf(req, socket), log, 'none');
          try {
            onLink(link);
          } catch (err) {
            log.error('onLink threw; dropping the connection', { error: (err as Error).message });
            link.destroy();
          }
        });
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

      return new Promise<Link>((resolve, reject) => {
        const ws = new WebSocket(url, {
          perMessageDeflate: false,
          maxPayload: MAX_RECORD,
          followRedirects: false,
          skipUTF8Validation: true,
          rejectUnauthorized,
          ...(zeroMask ? { generateMask: (mask: Buffer) => void mask.fill(0) } : {}),
        });
        let socket: Socket | undefined;
        let settled = false;
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
          ws.removeListener('error', onError);
          if (err) {
            // terminate() during the handshake reports an error of its own; keep it quiet.
            ws.on('error', () => {});
            ws.terminate();
            reject(err);
          }
        };
        const onError = (err: NodeJS.ErrnoException) => {
          const { reason, text } = describeWsDialError(err, url.hostname);
          settle(unreachable(reason, text, err));
        };
        const onAbort = function (this: AbortSignal) {
          settle(abortError(this));
        };
        const timer = setTimeout(
          () => settle(unreachable('timeout', `no WebSocket connection within ${connectTimeout} ms`)),
          connectTimeout,
        );
        for (const s of signals) s.addEventListener('abort', onAbort, { once: true });
        ws.on('error', onError);
        ws.once('upgrade', (res: http.IncomingMessage) => {
          socket = res.socket as Socket;
        });
        ws.once('unexpected-response', (req: http.ClientRequest, res: http.IncomingMessage) => {
          settle(
            unreachable(
              'rejected',
              `the web server answered HTTP ${res.statusCode} instead of a WebSocket upgrade (is the path ${url.pathname} right?)`,
            ),
          );
          req.destroy();
        });
        ws.once('open', () => {
          if (settled || !socket) {
            ws.terminate();
            return;
          }
          const link = new WsLink(ws, socket, formatPeer(socket.remoteAddress, socket.remotePort), log, zeroMask ? 'zero' : 'random');
          settle();
          resolve(link);
        });
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
