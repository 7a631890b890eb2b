/**
 * inbound "socks5": a local SOCKS5 proxy (RFC 1928) whose connections go
 * through the tunnel. Supports CONNECT and UDP ASSOCIATE, with no
 * authentication or username/password (RFC 1929). BIND is refused.
 *
 * The handshake is parsed as a state machine over a small bounded buffer, so a
 * client that sends garbage, dribbles bytes or stalls costs at most
 * MAX_HANDSHAKE_BYTES and `handshakeTimeout` ms before it is dropped.
 *
 * With `earlyReply` (the default) CONNECT is answered as soon as the open is
 * on its way, and what the app writes next follows it (Tunnel.openStream's
 * `early`), as shadowsocks does: one round trip to the server less per
 * connection. A refused destination then closes the connection after the
 * success reply; with earlyReply false the reply waits for the server and
 * carries the reason (reply codes 0x02-0x06).
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes, isDshieldError } from '../core/errors.ts';
import { formatHostPort, parseHostPort } from '../core/hostport.ts';
import { embeddedIpv4, formatIp, ipFromBytes, ipToBytes, parseIp, type IpAddress } from '../core/cidr.ts';
import { reopenPooled } from '../core/pooled-reads.ts';
import { Roster } from '../core/roster.ts';
import { splice } from '../core/splice.ts';
import type { InboundPlugin, Logger, Target, Tunnel, TunnelUdp } from '../core/types.ts';

interface Options {
  listen: string;
  username?: string;
  password?: string;
  udp: boolean;
  handshakeTimeout: number;
  earlyReply: boolean;
}

const VERSION = 0x05;
const AUTH_VERSION = 0x01;
const METHOD_NONE = 0x00;
const METHOD_USERPASS = 0x02;
const METHOD_REFUSED = 0xff;
const CMD_CONNECT = 0x01;
const CMD_UDP_ASSOCIATE = 0x03;
const ATYP_IPV4 = 0x01;
const ATYP_DOMAIN = 0x03;
const ATYP_IPV6 = 0x04;

/** Reply codes (RFC 1928 §6). */
export const SocksReply = {
  SUCCEEDED: 0x00,
  GENERAL_FAILURE: 0x01,
  NOT_ALLOWED: 0x02,
  NETWORK_UNREACHABLE: 0x03,
  HOST_UNREACHABLE: 0x04,
  CONNECTION_REFUSED: 0x05,
  TTL_EXPIRED: 0x06,
  COMMAND_NOT_SUPPORTED: 0x07,
  ADDRESS_TYPE_NOT_SUPPORTED: 0x08,
} as const;

/**
 * The largest handshake message is a username/password request (3 + 255 + 255
 * bytes); anything that needs more buffering than this is not SOCKS5.
 */
const MAX_HANDSHAKE_BYTES = 1024;
/** After a refusal is written, how long the client may take to close before we do. */
const LINGER_MS = 2_000;
const MAX_UDP_PAYLOAD = 65507;

const ZERO_V4: IpAddress = { family: 4, words: [0] };

/** How a failed stream open is told to the SOCKS client. */
export function replyCodeFor(err: unknown): number {
  if (isDshieldError(err, ErrorCodes.EGRESS_DENIED)) return SocksReply.NOT_ALLOWED;
  // The tunnel cannot carry streams (a datagram transport): CONNECT is a command this proxy cannot do.
  if (isDshieldError(err, ErrorCodes.UNSUPPORTED)) return SocksReply.COMMAND_NOT_SUPPORTED;
  if (isDshieldError(err, ErrorCodes.DESTINATION)) {
    switch (err.detail?.reason) {
      case 'refused':
        return SocksReply.CONNECTION_REFUSED;
      case 'unreachable': {
        const errno = err.detail?.errno;
        return errno === 'ENETUNREACH' || errno === 'ENETDOWN' ? SocksReply.NETWORK_UNREACHABLE : SocksReply.HOST_UNREACHABLE;
      }
      case 'dns':
        return SocksReply.HOST_UNREACHABLE;
      case 'timeout':
        return SocksReply.TTL_EXPIRED;
    }
  }
  return SocksReply.GENERAL_FAILURE;
}

/** ATYP + address + port, as in requests, replies and UDP headers. */
function encodeAddress(host: string, port: number): Buffer | null {
  const ip = parseIp(host);
  const portBytes = [(port >>> 8) & 0xff, port & 0xff];
  if (ip) {
    const plain = embeddedIpv4Mapped(ip);
    return Buffer.concat([Buffer.from([plain.family === 4 ? ATYP_IPV4 : ATYP_IPV6]), ipToBytes(plain), Buffer.from(portBytes)]);
  }
  const name = Buffer.from(host, 'utf8');
  if (name.length === 0 || name.length > 255) return null;
  return Buffer.concat([Buffer.from([ATYP_DOMAIN, name.length]), name, Buffer.from(portBytes)]);
}

/** "::ffff:1.2.3.4" as 1.2.3.4 (a dual-stack socket reports IPv4 peers that way); anything else unchanged. */
function embeddedIpv4Mapped(ip: IpAddress): IpAddress {
  if (ip.family === 6 && ip.words[0] === 0 && ip.words[1] === 0 && ip.words[2] === 0xffff) return embeddedIpv4(ip) ?? ip;
  return ip;
}

function plainAddress(address: string | undefined): string | undefined {
  if (!address) return undefined;
  const ip = parseIp(address);
  return ip ? formatIp(embeddedIpv4Mapped(ip)) : undefined;
}

function reply(code: number, bound: IpAddress = ZERO_V4, port = 0): Buffer {
  return Buffer.concat([
    Buffer.from([VERSION, code, 0x00, bound.family === 4 ? ATYP_IPV4 : ATYP_IPV6]),
    ipToBytes(bound),
    Buffer.from([(port >>> 8) & 0xff, port & 0xff]),
  ]);
}

type AddressParse =
  | { status: 'more' }
  | { status: 'bad-type' }
  | { status: 'bad-name' }
  | { status: 'ok'; target: Target; length: number };

/** Parses ATYP ADDR PORT at buf[offset]; 'more' when the buffer is still short. */
function parseAddress(buf: Buffer, offset: number): AddressParse {
  if (buf.length < offset + 1) return { status: 'more' };
  const atyp = buf[offset]!;
  let host: string;
  let addrEnd: number;
  if (atyp === ATYP_IPV4 || atyp === ATYP_IPV6) {
    const size = atyp === ATYP_IPV4 ? 4 : 16;
    addrEnd = offset + 1 + size;
    if (buf.length < addrEnd + 2) return { status: 'more' };
    host = formatIp(ipFromBytes(buf.subarray(offset + 1, addrEnd)));
  } else if (atyp === ATYP_DOMAIN) {
    if (buf.length < offset + 2) return { status: 'more' };
    const len = buf[offset + 1]!;
    addrEnd = offset + 2 + len;
    if (buf.length < addrEnd + 2) return { status: 'more' };
    if (len === 0) return { status: 'bad-name' };
    for (let k = offset + 2; k < addrEnd; k++) {
      const c = buf[k]!;
      if (c <= 0x20 || c === 0x7f) return { status: 'bad-name' };
    }
    host = buf.toString('utf8', offset + 2, addrEnd);
  } else {
    return { status: 'bad-type' };
  }
  const port = buf.readUInt16BE(addrEnd);
  return { status: 'ok', target: { host, port }, length: addrEnd + 2 - offset };
}

function secretDigest(value: string | Buffer): Buffer {
  return createHash('sha256').update(value).digest();
}

const portNumber = (v: unknown): string | undefined =>
  typeof v === 'number' && Number.isInteger(v) && v > 0 ? undefined : 'must be a positive integer';
const credential = (v: unknown): string | undefined =>
  typeof v === 'string' && Buffer.byteLength(v) >= 1 && Buffer.byteLength(v) <= 255 ? undefined : 'must be 1 to 255 bytes';

export default definePlugin<'inbound', Options>({
  kind: 'inbound',
  name: 'socks5',
  description: 'a local SOCKS5 proxy (CONNECT and UDP ASSOCIATE; optional username/password)',
  modes: ['client'],
  options: {
    listen: { type: 'string', description: 'address to listen on, host:port', default: '127.0.0.1:1080' },
    username: { type: 'string', description: 'require RFC 1929 username/password authentication with this username', validate: credential },
    password: { type: 'string', description: 'the password that goes with username', validate: credential },
    udp: { type: 'boolean', description: 'accept UDP ASSOCIATE', default: true },
    handshakeTimeout: {
      type: 'number',
      description: 'milliseconds a client has to complete the SOCKS handshake',
      default: 10_000,
      validate: portNumber,
    },
    earlyReply: {
      type: 'boolean',
      description:
        'answer CONNECT at once and send what the app writes right behind the open, without waiting for the server to reach the destination: one round trip to the server less per connection; a destination that cannot be reached then closes the connection after a success reply, instead of a SOCKS5 error code',
      default: true,
    },
  },
  create(options, ctx) {
    const listen = options.listen ?? '127.0.0.1:1080';
    const where = 'inbound socks5 "listen"';
    const bind = parseHostPort(listen, where);
    const { username, password } = options;
    if ((username === undefined) !== (password === undefined)) {
      throw new DshieldError(ErrorCodes.CONFIG, 'inbound socks5: set both "username" and "password", or neither');
    }
    const auth = username !== undefined ? { user: secretDigest(username), pass: secretDigest(password!) } : undefined;
    const allowUdp = options.udp ?? true;
    const handshakeTimeout = options.handshakeTimeout ?? 10_000;
    const earlyReply = options.earlyReply ?? true;
    const log = ctx.log;

    // Rosters, not Sets: every client connection passes through (see core/roster.ts).
    const sockets = new Roster<Socket>();
    const cleanups = new Roster<() => void>();
    let server: Server | undefined;
    let closed = false;

    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      const srv = server;
      const stopped = srv ? new Promise<void>((resolve) => srv.close(() => resolve())) : Promise.resolve();
      for (const s of sockets.values()) s.destroy();
      for (const c of cleanups.values()) c();
      await stopped;
    };
    ctx.signal.addEventListener('abort', () => void close(), { once: true });

    const handle = (socket: Socket, tunnel: Tunnel): void => {
      const listed = sockets.add(socket);
      socket.setNoDelay(true);
      socket.on('error', (err: NodeJS.ErrnoException) => log.debug('client connection error', { error: err.code ?? err.message }));
      socket.once('close', () => {
        sockets.remove(listed);
        clearTimeout(timer);
      });

      let buf: Buffer = Buffer.alloc(0);
      let state: 'greeting' | 'auth' | 'request' | 'done' = 'greeting';
      const timer = setTimeout(() => {
        log.debug('handshake timed out', { peer: socket.remoteAddress });
        socket.destroy();
      }, handshakeTimeout);

      /** Writes a final message and closes; further input is read and discarded so the reply is not lost to a reset. */
      const refuse = (bytes: Buffer): void => {
        state = 'done';
        clearTimeout(timer);
        socket.removeListener('data', onData);
        socket.resume();
        socket.end(bytes);
        setTimeout(() => socket.destroy(), LINGER_MS).unref();
      };
      const drop = (): void => {
        state = 'done';
        socket.destroy();
      };

      const onData = (chunk: Buffer): void => {
        buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
        if (buf.length > MAX_HANDSHAKE_BYTES) return drop();
        advance();
      };

      const advance = (): void => {
        for (;;) {
          if (state === 'greeting') {
            // VER NMETHODS METHODS...
            if (buf.length < 2) return;
            if (buf[0] !== VERSION || buf[1] === 0) return drop();
            const n = buf[1]!;
            if (buf.length < 2 + n) return;
            const methods = buf.subarray(2, 2 + n);
            buf = buf.subarray(2 + n);
            let method: number;
            if (auth) method = methods.includes(METHOD_USERPASS) ? METHOD_USERPASS : METHOD_REFUSED;
            // Without credentials configured, a client that only offers username/password is let in with any.
            else method = methods.includes(METHOD_NONE) ? METHOD_NONE : methods.includes(METHOD_USERPASS) ? METHOD_USERPASS : METHOD_REFUSED;
            if (method === METHOD_REFUSED) return refuse(Buffer.from([VERSION, METHOD_REFUSED]));
            socket.write(Buffer.from([VERSION, method]));
            state = method === METHOD_USERPASS ? 'auth' : 'request';
          } else if (state === 'auth') {
            // VER ULEN UNAME PLEN PASSWD
            if (buf.length < 2) return;
            if (buf[0] !== AUTH_VERSION) return drop();
            const ulen = buf[1]!;
            if (buf.length < 3 + ulen) return;
            const plen = buf[2 + ulen]!;
            if (buf.length < 3 + ulen + plen) return;
            const user = buf.subarray(2, 2 + ulen);
            const pass = buf.subarray(3 + ulen, 3 + ulen + plen);
            buf = buf.subarray(3 + ulen + plen);
            if (auth) {
              // Compare digests in constant time; check both so timing does not tell which one was wrong.
              const userOk = timingSafeEqual(secretDigest(user), auth.user);
              const passOk = timingSafeEqual(secretDigest(pass), auth.pass);
              if (!(userOk && passOk)) {
                log.debug('authentication failed', { peer: socket.remoteAddress });
                return refuse(Buffer.from([AUTH_VERSION, 0x01]));
              }
            }
            socket.write(Buffer.from([AUTH_VERSION, 0x00]));
            state = 'request';
          } else if (state === 'request') {
            // VER CMD RSV ATYP DST.ADDR DST.PORT
            if (buf.length < 4) return;
            if (buf[0] !== VERSION) return drop();
            const cmd = buf[1]!;
            const parsed = parseAddress(buf, 3);
            if (parsed.status === 'more') return;
            if (parsed.status === 'bad-type') return refuse(reply(SocksReply.ADDRESS_TYPE_NOT_SUPPORTED));
            if (parsed.status === 'bad-name') return refuse(reply(SocksReply.HOST_UNREACHABLE));
            const rest = buf.subarray(3 + parsed.length);
            buf = Buffer.alloc(0);
            if (cmd === CMD_CONNECT) {
              startConnect(parsed.target, rest);
            } else if (cmd === CMD_UDP_ASSOCIATE && allowUdp) {
              startUdp(parsed.target);
            } else {
              refuse(reply(SocksReply.COMMAND_NOT_SUPPORTED));
            }
            return;
          } else {
            return;
          }
        }
      };

      const startConnect = (target: Target, pipelined: Buffer): void => {
        state = 'done';
        clearTimeout(timer);
        // Hold what the client sends next until the stream exists; the socket buffers it (TCP backpressure).
        socket.removeListener('data', onData);
        socket.pause();
        tunnel.openStream(target, { early: earlyReply }).then(
          (stream) => {
            if (socket.destroyed || closed) {
              stream.destroy();
              return;
            }
            if (earlyReply) {
              // The open may still be refused: the app then sees its connection closed, and the log says why.
              stream.once('error', (err: Error) =>
                log.debug('stream failed', {
                  target: formatHostPort(target.host, target.port),
                  error: err instanceof DshieldError ? err.code : err.message,
                }),
              );
            }
            const local = parseIp(plainAddress(socket.localAddress) ?? '') ?? ZERO_V4;
            socket.write(reply(SocksReply.SUCCEEDED, local, socket.localPort ?? 0));
            if (pipelined.length > 0) stream.write(pipelined); // bytes the app sent right behind its request
            void splice(socket, stream);
          },
          (err: unknown) => {
            const code = replyCodeFor(err);
            log.debug('stream open failed', {
              target: formatHostPort(target.host, target.port),
              reply: code,
              error: err instanceof DshieldError ? err.code : String(err),
            });
            if (!socket.destroyed) refuse(reply(code));
          },
        );
      };

      const startUdp = (requested: Target): void => {
        state = 'done';
        clearTimeout(timer);
        socket.removeListener('data', onData);
        // The control connection only marks the association's lifetime; anything sent on it is discarded.
        socket.resume();
        socket.on('end', () => socket.end());

        const clientIp = plainAddress(socket.remoteAddress);
        const localIp = plainAddress(socket.localAddress);
        const local = localIp ? parseIp(localIp) : null;
        if (!clientIp || !localIp || !local) return refuse(reply(SocksReply.GENERAL_FAILURE));
        // The client may name the port it will send from; 0 means "learn it from the first datagram".
        const fixedPort = requested.port !== 0 ? requested.port : undefined;
        const association = new UdpAssociation(clientIp, fixedPort, log);
        const cleanup = () => association.close();
        const cleanupListed = cleanups.add(cleanup);
        socket.once('close', () => {
          cleanups.remove(cleanupListed);
          association.close();
        });
        association.open(local, localIp, tunnel).then(
          (port) => {
            if (socket.destroyed) return association.close();
            socket.write(reply(SocksReply.SUCCEEDED, local, port));
          },
          (err: unknown) => {
            log.debug('udp associate failed', { error: err instanceof Error ? err.message : String(err) });
            association.close();
            if (!socket.destroyed) refuse(reply(replyCodeFor(err)));
          },
        );
      };

      socket.on('data', onData);
      socket.resume(); // it starts paused: accepted with pauseOnConnect, or reopened paused
    };

    const plugin: InboundPlugin = {
      name: 'socks5',
      start(tunnel) {
        if (closed) return Promise.reject(new DshieldError(ErrorCodes.LISTEN, 'inbound socks5 was closed'));
        // Accepted paused, so that nothing is read before the socket is reopened to read into reused memory (uploads).
        const srv = createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (socket) => {
          if (closed) socket.destroy();
          else handle(reopenPooled(socket, { allowHalfOpen: true }), tunnel);
        });
        server = srv;
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
            reject(new DshieldError(ErrorCodes.LISTEN, `socks5 proxy cannot listen on ${listen}: ${why}`, { cause: err }));
          });
          srv.listen(bind.port, bind.host, () => {
            srv.on('error', (err) => log.warn('socks5 listener error', { error: err.message }));
            const a = srv.address() as AddressInfo;
            resolve({ address: `socks5://${formatHostPort(a.address, a.port)}` });
          });
        });
      },
      close,
    };
    return plugin;
  },
});

/**
 * One UDP ASSOCIATE: a UDP socket next to the listener that takes SOCKS UDP
 * datagrams from the client (and only from it), sends their payload through
 * the tunnel, and wraps what comes back in the SOCKS UDP header.
 */
class UdpAssociation {
  private socket: UdpSocket | undefined;
  private tunnelUdp: TunnelUdp | undefined;
  private closed = false;

  constructor(
    private readonly clientIp: string,
    private clientPort: number | undefined,
    private readonly log: Logger,
  ) {}

  /** Binds next to the listener; resolves with the bound port. */
  open(local: IpAddress, localIp: string, tunnel: Tunnel): Promise<number> {
    return new Promise((resolve, reject) => {
      let socket: UdpSocket;
      try {
        socket = createSocket(local.family === 4 ? { type: 'udp4' } : { type: 'udp6', ipv6Only: true });
        this.tunnelUdp = tunnel.openUdp();
      } catch (err) {
        reject(err);
        return;
      }
      this.socket = socket;
      this.tunnelUdp.onMessage((from, payload) => this.toClient(from, payload));
      socket.once('error', reject);
      socket.on('message', (msg, rinfo) => this.fromClient(msg, rinfo.address, rinfo.port));
      socket.bind(0, localIp, () => {
        socket.removeListener('error', reject);
        socket.on('error', (err) => this.log.debug('udp association socket error', { error: err.message }));
        if (this.closed) reject(new DshieldError(ErrorCodes.STREAM_RESET, 'association closed'));
        else resolve(socket.address().port);
      });
    });
  }

  private fromClient(msg: Buffer, address: string, port: number): void {
    if (this.closed || plainAddress(address) !== this.clientIp) return;
    if (this.clientPort === undefined) this.clientPort = port;
    else if (port !== this.clientPort) return;
    // RSV(2) FRAG(1) ATYP ADDR PORT DATA; fragments are not supported (RFC 1928 §7 allows dropping them).
    if (msg.length < 4 || msg[2] !== 0) return;
    const parsed = parseAddress(msg, 3);
    if (parsed.status !== 'ok') return;
    this.tunnelUdp?.send(parsed.target, msg.subarray(3 + parsed.length));
  }

  private toClient(from: Target, payload: Buffer): void {
    if (this.closed || this.clientPort === undefined || !this.socket) return;
    const address = encodeAddress(from.host, from.port);
    if (!address) return;
    const datagram = Buffer.concat([Buffer.from([0, 0, 0]), address, payload]);
    if (datagram.length > MAX_UDP_PAYLOAD) return;
    this.socket.send(datagram, this.clientPort, this.clientIp);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.tunnelUdp?.close();
    try {
      this.socket?.close();
    } catch {
      // not bound yet or already closed
    }
  }
}
