/**
 * inbound "http": a local HTTP proxy whose connections go through the tunnel.
 *
 *  - CONNECT host:port (RFC 9110 §9.3.6): opens a tunnel stream, answers
 *    "200 Connection Established" and then relays raw bytes both ways. This is
 *    how HTTPS and any other TCP protocol pass through. With `earlyReply` (the
 *    default) the answer comes at once and the client's first bytes follow
 *    the open (Tunnel.openStream's `early`); a refusal then closes the
 *    connection instead of answering 403/502.
 *  - Absolute-form requests (GET http://host/path, RFC 9112 §3.2.2): one tunnel
 *    stream per request; the request goes on in origin-form with hop-by-hop
 *    headers removed and Host taken from the URL, and the response comes back
 *    the same way. Bodies stream in both directions with backpressure. The
 *    request always follows the open at once: no answer has been written
 *    yet, so a refusal still gets its 403/502/504.
 *
 * node:http parses the client side (bounded header size and header timeout),
 * and node:http's client writes the request onto the tunnel stream.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes, isDshieldError } from '../core/errors.ts';
import { formatHostPort, parseHostPort } from '../core/hostport.ts';
import { Roster } from '../core/roster.ts';
import { splice } from '../core/splice.ts';
import type { InboundPlugin, Logger, Target, Tunnel } from '../core/types.ts';

interface Options {
  listen: string;
  username?: string;
  password?: string;
  headersTimeout: number;
  earlyReply: boolean;
}

/** After an error response on a raw socket, how long the client may take to close before we do. */
const LINGER_MS = 2_000;
const REALM = 'dshield';

/** Hop-by-hop fields (RFC 9110 §7.6.1) plus the proxy's own ones; never forwarded. */
const HOP_BY_HOP = new Set([
  'connection',
  'proxy-connection',
  'keep-alive',
  'proxy-authorization',
  'proxy-authenticate',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  // node:http has already answered "100 Continue" to the client itself.
  'expect',
]);

/** How a failed stream open is told to the HTTP client. */
export function statusFor(err: unknown): { status: number; text: string } {
  if (isDshieldError(err, ErrorCodes.EGRESS_DENIED)) {
    return { status: 403, text: `the destination is not allowed by the server's egress policy (${err.message})` };
  }
  if (isDshieldError(err, ErrorCodes.DESTINATION)) {
    const reason = err.detail?.reason;
    if (reason === 'timeout') return { status: 504, text: `the destination did not answer in time (${err.message})` };
    return { status: 502, text: `the destination could not be reached (${err.message})` };
  }
  if (isDshieldError(err, ErrorCodes.TUNNEL_DOWN)) return { status: 502, text: `the tunnel is down (${err.message})` };
  return { status: 502, text: 'the connection through the tunnel failed' };
}

const REASONS: Record<number, string> = {
  400: 'Bad Request',
  403: 'Forbidden',
  407: 'Proxy Authentication Required',
  501: 'Not Implemented',
  502: 'Bad Gateway',
  504: 'Gateway Timeout',
};

/** A complete response written straight to a socket (CONNECT and upgrade paths have no ServerResponse). */
function rawResponse(socket: Socket | Duplex, status: number, text: string, extraHeaders: string[] = []): void {
  const body = Buffer.from(`${text}\n`);
  const head =
    `HTTP/1.1 ${status} ${REASONS[status] ?? 'Error'}\r\n` +
    'Content-Type: text/plain; charset=utf-8\r\n' +
    `Content-Length: ${body.length}\r\n` +
    'Connection: close\r\n' +
    extraHeaders.map((h) => `${h}\r\n`).join('') +
    '\r\n';
  // Read and discard whatever else arrives, so the answer is not lost to a reset.
  socket.resume();
  socket.end(Buffer.concat([Buffer.from(head, 'latin1'), body]));
  setTimeout(() => socket.destroy(), LINGER_MS).unref();
}

function textResponse(res: ServerResponse, status: number, text: string, extraHeaders: Record<string, string> = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const body = `${text}\n`;
  res.shouldKeepAlive = false;
  res.writeHead(status, {
    'Content-Type': 'text/plain; charset=utf-8',
    'Content-Length': Buffer.byteLength(body),
    Connection: 'close',
    ...extraHeaders,
  });
  res.end(body);
}

/** The names a message's Connection (and legacy Proxy-Connection) header adds to the hop-by-hop set. */
function connectionTokens(rawHeaders: string[]): Set<string> {
  const names = new Set<string>();
  for (let k = 0; k < rawHeaders.length; k += 2) {
    const name = rawHeaders[k]!.toLowerCase();
    if (name !== 'connection' && name !== 'proxy-connection') continue;
    for (const token of rawHeaders[k + 1]!.split(',')) {
      const t = token.trim().toLowerCase();
      if (t) names.add(t);
    }
  }
  return names;
}

/** rawHeaders minus hop-by-hop fields, as a flat [name, value, ...] list; `skip` removes more. */
function endToEndHeaders(rawHeaders: string[], skip: ReadonlySet<string> = new Set()): string[] {
  const listed = connectionTokens(rawHeaders);
  const out: string[] = [];
  for (let k = 0; k < rawHeaders.length; k += 2) {
    const name = rawHeaders[k]!;
    const lower = name.toLowerCase();
    if (HOP_BY_HOP.has(lower) || listed.has(lower) || skip.has(lower)) continue;
    out.push(name, rawHeaders[k + 1]!);
  }
  return out;
}

/**
 * Splits an absolute-form "http://authority/path?query" into the target and
 * the origin-form path, keeping the path bytes exactly as the client sent them.
 */
function parseAbsoluteHttp(url: string): { target: Target; hostHeader: string; path: string } | null {
  const afterScheme = 7; // "http://"
  let end = url.length;
  for (let k = afterScheme; k < url.length; k++) {
    const c = url[k];
    if (c === '/' || c === '?' || c === '#') {
      end = k;
      break;
    }
  }
  const authority = url.slice(afterScheme, end);
  if (authority === '') return null;
  let parsed: URL;
  try {
    parsed = new URL(`http://${authority}/`);
  } catch {
    return null;
  }
  let rest = url.slice(end);
  const hash = rest.indexOf('#');
  if (hash >= 0) rest = rest.slice(0, hash);
  const path = rest === '' ? '/' : rest.startsWith('?') ? `/${rest}` : rest;
  let host = parsed.hostname;
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  const port = parsed.port === '' ? 80 : Number(parsed.port);
  if (host === '' || !(port >= 1 && port <= 65535)) return null;
  return { target: { host, port }, hostHeader: parsed.host, path };
}

/** CONNECT's authority-form "host:port" (IPv6 in brackets). */
function parseAuthority(authority: string | undefined): Target | null {
  if (!authority) return null;
  try {
    const { host, port } = parseHostPort(authority, 'CONNECT target');
    return port >= 1 ? { host, port } : null;
  } catch {
    return null;
  }
}

function secretDigest(value: string | Buffer): Buffer {
  return createHash('sha256').update(value).digest();
}

const positiveInteger = (v: unknown): string | undefined =>
  typeof v === 'number' && Number.isInteger(v) && v > 0 ? undefined : 'must be a positive integer';
const credential = (v: unknown): string | undefined =>
  typeof v === 'string' && v.length > 0 && !v.includes('\n') ? undefined : 'must be a non-empty single-line string';

export default definePlugin<'inbound', Options>({
  kind: 'inbound',
  name: 'http',
  description: 'a local HTTP proxy (CONNECT and plain http:// requests; optional Basic proxy authentication)',
  modes: ['client'],
  options: {
    listen: { type: 'string', description: 'address to listen on, host:port', default: '127.0.0.1:8080' },
    username: { type: 'string', description: 'require Proxy-Authorization: Basic with this username', validate: credential },
    password: { type: 'string', description: 'the password that goes with username', validate: credential },
    headersTimeout: {
      type: 'number',
      description: 'milliseconds a client has to send a complete request head',
      default: 30_000,
      validate: positiveInteger,
    },
    earlyReply: {
      type: 'boolean',
      description:
        'answer CONNECT at once and send what the client writes right behind the open, without waiting for the server to reach the destination: one round trip to the server less per connection; a destination that cannot be reached then closes the connection after "200", instead of a 403/502 answer',
      default: true,
    },
  },
  create(options, ctx) {
    const listen = options.listen ?? '127.0.0.1:8080';
    const bind = parseHostPort(listen, 'inbound http "listen"');
    const { username, password } = options;
    if ((username === undefined) !== (password === undefined)) {
      throw new DshieldError(ErrorCodes.CONFIG, 'inbound http: set both "username" and "password", or neither');
    }
    if (username !== undefined && username.includes(':')) {
      throw new DshieldError(ErrorCodes.CONFIG, 'inbound http: "username" cannot contain ":" (Basic authentication splits on it)');
    }
    const expected = username !== undefined ? { user: secretDigest(username), pass: secretDigest(password!) } : undefined;
    const headersTimeout = options.headersTimeout ?? 30_000;
    const earlyReply = options.earlyReply ?? true;
    const log = ctx.log;

    // A roster, not a Set: every client connection passes through (see core/roster.ts).
    const sockets = new Roster<Socket>();
    let server: Server | undefined;
    let closed = false;

    /** True when no credentials are configured or the request carries the right ones. */
    const authorized = (req: IncomingMessage): boolean => {
      if (!expected) return true;
      const header = req.headers['proxy-authorization'];
      if (typeof header !== 'string') return false;
      const space = header.indexOf(' ');
      if (space < 0 || header.slice(0, space).toLowerCase() !== 'basic') return false;
      const decoded = Buffer.from(header.slice(space + 1).trim(), 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon < 0) return false;
      const userOk = timingSafeEqual(secretDigest(decoded.slice(0, colon)), expected.user);
      const passOk = timingSafeEqual(secretDigest(decoded.slice(colon + 1)), expected.pass);
      return userOk && passOk;
    };
    const challenge = `Basic realm="${REALM}", charset="UTF-8"`;

    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      const srv = server;
      const stopped = srv ? new Promise<void>((resolve) => srv.close(() => resolve())) : Promise.resolve();
      srv?.closeAllConnections();
      for (const s of sockets.values()) s.destroy();
      await stopped;
    };
    ctx.signal.addEventListener('abort', () => void close(), { once: true });

    const onConnect = (tunnel: Tunnel, req: IncomingMessage, socket: Socket, head: Buffer): void => {
      socket.on('error', (err: NodeJS.ErrnoException) => log.debug('CONNECT client error', { error: err.code ?? err.message }));
      if (!authorized(req)) {
        rawResponse(socket, 407, 'proxy authentication required', [`Proxy-Authenticate: ${challenge}`]);
        return;
      }
      const target = parseAuthority(req.url);
      if (!target) {
        rawResponse(socket, 400, 'CONNECT needs host:port');
        return;
      }
      // Nothing is read from the client until the stream exists; node:http leaves the socket unread after CONNECT.
      socket.pause();
      tunnel.openStream(target, { early: earlyReply }).then(
        (stream) => {
          if (socket.destroyed || closed) {
            stream.destroy();
            return;
          }
          // An early stream may yet be refused: the client then sees its connection closed, and the log says why.
          if (earlyReply) stream.once('error', (err: Error) => logFailure(log, target, err, 200));
          socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
          // Bytes the client sent right after the CONNECT head (e.g. a TLS ClientHello) belong to the tunnel.
          if (head.length > 0) stream.write(head);
          void splice(socket, stream);
        },
        (err: unknown) => {
          const { status, text } = statusFor(err);
          logFailure(log, target, err, status);
          if (!socket.destroyed) rawResponse(socket, status, text);
        },
      );
    };

    const onRequest = (tunnel: Tunnel, req: IncomingMessage, res: ServerResponse): void => {
      const url = req.url ?? '';
      const scheme = url.slice(0, 8).toLowerCase();
      if (scheme === 'https://') {
        textResponse(res, 400, 'https:// URLs must use CONNECT: configure this proxy for HTTPS too (e.g. https_proxy)');
        return;
      }
      if (!scheme.startsWith('http://')) {
        textResponse(res, 400, 'this is a proxy: send absolute http:// URLs or CONNECT');
        return;
      }
      if (!authorized(req)) {
        textResponse(res, 407, 'proxy authentication required', { 'Proxy-Authenticate': challenge });
        return;
      }
      const parsed = parseAbsoluteHttp(url);
      if (!parsed) {
        textResponse(res, 400, 'the request URL has no valid host or port');
        return;
      }
      const { target, hostHeader, path } = parsed;

      // Early: the request follows the open at once; a refusal comes as the stream's error, before any answer (forward()).
      tunnel.openStream(target, { early: true }).then(
        (stream) => forward(req, res, stream, target, hostHeader, path),
        (err: unknown) => {
          const { status, text } = statusFor(err);
          logFailure(log, target, err, status);
          textResponse(res, status, text);
        },
      );
    };

    /** One request and its response over one tunnel stream. */
    const forward = (req: IncomingMessage, res: ServerResponse, stream: Duplex, target: Target, hostHeader: string, path: string): void => {
      if (res.destroyed || closed) {
        stream.destroy();
        return;
      }
      // The URL's authority replaces any Host the client sent (RFC 9112 §3.2.2).
      const headers = ['Host', hostHeader, ...endToEndHeaders(req.rawHeaders, new Set(['host']))];
      if (req.headers['transfer-encoding'] !== undefined && req.headers['content-length'] === undefined) {
        // node:http decoded the chunks; node:http's client encodes them again.
        headers.push('Transfer-Encoding', 'chunked');
      }
      // One stream per request: ask the origin to close after answering, and expect no reuse.
      headers.push('Connection', 'close');
      const upstream = httpRequest({
        method: req.method,
        path,
        headers,
        createConnection: () => stream as unknown as Socket,
      });
      let done = false;
      const abort = (): void => {
        if (done) return;
        done = true;
        upstream.destroy();
        stream.destroy();
      };
      upstream.on('error', (err: Error) => {
        if (done) return;
        if (isDshieldError(err) && !res.headersSent) {
          // The server refused the stream (it was opened early): the same answer as a refused open.
          const { status, text } = statusFor(err);
          logFailure(log, target, err, status);
          textResponse(res, status, text);
        } else {
          log.debug('upstream request failed', { target: formatHostPort(target.host, target.port), error: err.message });
          if (!res.headersSent) textResponse(res, 502, `the destination closed the connection (${err.message})`);
          else res.destroy();
        }
        abort();
      });
      upstream.on('response', (upRes: IncomingMessage) => {
        const status = upRes.statusCode ?? 502;
        res.writeHead(status, upRes.statusMessage, endToEndHeaders(upRes.rawHeaders));
        upRes.pipe(res);
        upRes.on('error', () => res.destroy());
      });
      // The origin answered before the whole request body arrived: read and drop the rest,
      // so the client's connection is ready for its next request.
      res.once('finish', () => {
        if (!req.complete) {
          req.unpipe(upstream);
          req.resume();
        }
      });
      // The client went away (or the response is complete): release the stream.
      res.once('close', () => {
        if (!res.writableFinished) log.debug('client closed before the response was complete', { target: formatHostPort(target.host, target.port) });
        abort();
      });
      req.once('error', abort);
      req.pipe(upstream);
    };

    const plugin: InboundPlugin = {
      name: 'http',
      start(tunnel) {
        if (closed) return Promise.reject(new DshieldError(ErrorCodes.LISTEN, 'inbound http was closed'));
        const srv = createServer({
          // Uploads and downloads can take long; only the request head has a deadline.
          requestTimeout: 0,
          headersTimeout,
          keepAliveTimeout: 5_000,
        });
        server = srv;
        srv.on('connection', (socket: Socket) => {
          if (closed) return socket.destroy();
          socket.setNoDelay(true);
          const listed = sockets.add(socket);
          socket.once('close', () => sockets.remove(listed));
        });
        srv.on('request', (req: IncomingMessage, res: ServerResponse) => onRequest(tunnel, req, res));
        srv.on('connect', (req: IncomingMessage, socket: Socket, head: Buffer) => onConnect(tunnel, req, socket, head));
        srv.on('upgrade', (_req: IncomingMessage, socket: Socket) => {
          socket.on('error', () => {});
          rawResponse(socket, 501, 'protocol upgrades through this proxy are not supported; use CONNECT');
        });
        return new Promise((resolve, reject) => {
          srv.once('error', (err: NodeJS.ErrnoException) => {
            const why =
              err.code === 'EADDRINUSE'
                ? 'the address is already in use'
                : err.code === 'EACCES'
                  ? 'permission denied (ports below 1024 need privileges)'
                  : err.code === 'EADDRNOTAVAIL'
                    ? 'no such local address'
                    : (err.code ?? err.message);
            reject(new DshieldError(ErrorCodes.LISTEN, `http proxy cannot listen on ${listen}: ${why}`, { cause: err }));
          });
          srv.listen(bind.port, bind.host, () => {
            srv.on('error', (err) => log.warn('http listener error', { error: err.message }));
            const a = srv.address() as AddressInfo;
            resolve({ address: `http://${formatHostPort(a.address, a.port)}` });
          });
        });
      },
      close,
    };
    return plugin;
  },
});

function logFailure(log: Logger, target: Target, err: unknown, status: number): void {
  log.debug('stream open failed', {
    target: formatHostPort(target.host, target.port),
    status,
    error: err instanceof DshieldError ? err.code : String(err),
  });
}
