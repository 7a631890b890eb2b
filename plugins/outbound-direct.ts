/**
 * outbound "direct": the server reaches destinations itself, over its own
 * network, subject to the egress policy.
 *
 * Every connection and every UDP datagram is checked on the address it will
 * really go to: names are resolved here, each resolved address is checked,
 * and the socket connects to the checked address literal. No second lookup
 * happens after the check, so a name that resolves to a public address for
 * the check and to 127.0.0.1 for the connect (DNS rebinding) gets nowhere.
 */
import { lookup as dnsLookup } from 'node:dns';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import type { Socket } from 'node:net';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { EgressPolicy, formatIp, parseIp, type IpAddress } from '../core/cidr.ts';
import type { Logger, OutboundPlugin, Target, UdpRelay } from '../core/types.ts';
import { watchAbort } from '../core/abort-watch.ts';
import { Roster, type RosterTicket } from '../core/roster.ts';
import { connectPooled } from '../core/pooled-reads.ts';

/** The largest UDP payload IPv4 can carry (65535 - 20 IP - 8 UDP). */
const MAX_DATAGRAM = 65507;

type FailReason = 'refused' | 'unreachable' | 'dns' | 'timeout';

interface Options {
  allow: string[];
  connectTimeout: number;
  udpMaxPendingLookups: number;
}

interface Resolved {
  address: string;
  family: 4 | 6;
}

const positiveInteger = (v: unknown): string | undefined =>
  typeof v === 'number' && Number.isInteger(v) && v > 0 ? undefined : 'must be a positive integer';

export default definePlugin<'outbound', Options>({
  kind: 'outbound',
  name: 'direct',
  description: 'connects to destinations from the server itself, after the egress policy allows the resolved address',
  modes: ['server'],
  options: {
    allow: {
      type: 'string[]',
      description: 'extra ranges to exempt from the default egress deny list, on top of server.egress.allow',
      default: [],
    },
    connectTimeout: {
      type: 'number',
      description: 'milliseconds for DNS plus TCP connect before the attempt fails with reason "timeout"',
      default: 10_000,
      validate: positiveInteger,
    },
    udpMaxPendingLookups: {
      type: 'number',
      description: 'DNS lookups one UDP association may have in flight; datagrams beyond are dropped',
      default: 16,
      validate: positiveInteger,
    },
  },
  create(options, ctx) {
    const opts: Options = {
      allow: options.allow ?? [],
      connectTimeout: options.connectTimeout ?? 10_000,
      udpMaxPendingLookups: options.udpMaxPendingLookups ?? 16,
    };
    const policy = new EgressPolicy([...(ctx.config.server.egress.allow ?? []), ...opts.allow]);
    const log = ctx.log;
    // Rosters, not Sets: every connect and UDP association passes through (see core/roster.ts).
    const attempts = new Roster<Socket>();
    const relays = new Roster<DirectUdpRelay>();
    let closed = false;

    const close = (): void => {
      if (closed) return;
      closed = true;
      for (const s of attempts.values()) s.destroy();
      for (const r of relays.values()) r.close();
    };
    ctx.signal.addEventListener('abort', close, { once: true });

    const plugin: OutboundPlugin = {
      name: 'direct',
      connect(target, signal) {
        if (closed) return Promise.reject(new DshieldError(ErrorCodes.STREAM_RESET, 'the server is shutting down'));
        return connectChecked(target, { policy, timeoutMs: opts.connectTimeout, signal, attempts, log });
      },
      udp() {
        let listed: RosterTicket<DirectUdpRelay> | undefined;
        const relay = new DirectUdpRelay(policy, log, opts.udpMaxPendingLookups, () => {
          if (listed) relays.remove(listed);
        });
        if (closed) relay.close();
        else listed = relays.add(relay);
        return relay;
      },
      close,
    };
    return plugin;
  },
});

// ---------------------------------------------------------------------------
// TCP

function destinationError(target: Target, reason: FailReason, message: string, cause?: unknown, extra?: Record<string, unknown>): DshieldError {
  return new DshieldError(ErrorCodes.DESTINATION, `${target.host}:${target.port} ${message}`, {
    cause,
    detail: { reason, host: target.host, port: target.port, ...extra },
  });
}

function reasonForErrno(code: string | undefined): FailReason {
  switch (code) {
    case 'ECONNREFUSED':
      return 'refused';
    case 'ETIMEDOUT':
      return 'timeout';
    default:
      // ENETUNREACH, EHOSTUNREACH, ENETDOWN, EHOSTDOWN, EADDRNOTAVAIL, ECONNRESET...
      return 'unreachable';
  }
}

/** Strips the brackets a user may have left around an IPv6 literal. */
function bareHost(host: string): string {
  return host.length > 1 && host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
}

function resolveAll(host: string): Promise<Resolved[]> {
  return new Promise((resolve, reject) => {
    dnsLookup(host, { all: true }, (err, addresses) => {
      if (err) reject(err);
      else resolve(addresses.map((a) => ({ address: a.address, family: a.family === 6 ? 6 : 4 })));
    });
  });
}

/** An address in canonical form (RFC 5952), for messages and for the UDP reply source. */
function show(address: string): string {
  const ip = parseIp(address);
  return ip ? formatIp(ip) : address;
}

interface ConnectContext {
  policy: EgressPolicy;
  timeoutMs: number;
  signal: AbortSignal | undefined;
  attempts: Roster<Socket>;
  log: Logger;
}

async function connectChecked(target: Target, cx: ConnectContext): Promise<Socket> {
  const host = bareHost(target.host);
  const port = target.port;
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw destinationError(target, 'unreachable', `has an invalid port`);
  }
  const deadline = Date.now() + cx.timeoutMs;
  let lookupTimer: NodeJS.Timeout | undefined;
  let addresses: Resolved[];
  try {
    // dns.lookup cannot be cancelled; racing it keeps our bound (the lookup finishes in the background).
    addresses = await Promise.race([
      resolveAll(host),
      new Promise<never>((_, reject) => {
        lookupTimer = setTimeout(() => reject(Object.assign(new Error('lookup timed out'), { code: 'DSHIELD_TIMEOUT' })), cx.timeoutMs);
      }),
    ]);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'DSHIELD_TIMEOUT') throw destinationError(target, 'timeout', `did not resolve within ${cx.timeoutMs} ms`, err);
    throw destinationError(target, 'dns', `could not be resolved (${code ?? (err as Error).message})`, err, { errno: code });
  } finally {
    clearTimeout(lookupTimer);
  }
  if (cx.signal?.aborted) throw new DshieldError(ErrorCodes.STREAM_RESET, `connection to ${host}:${port} was cancelled`);

  const allowed = addresses.filter((a) => cx.policy.check(a.address));
  if (allowed.length === 0) {
    const shown = addresses.map((a) => show(a.address));
    const what = shown.length === 0 ? host : host === shown[0] ? host : `${host} (${shown.join(', ')})`;
    throw new DshieldError(ErrorCodes.EGRESS_DENIED, `destination ${what} is not allowed by the egress policy`, {
      detail: { host, port, addresses: shown },
    });
  }
  if (allowed.length < addresses.length) {
    cx.log.debug('some resolved addresses are denied by the egress policy; using the others', {
      host,
      denied: addresses.filter((a) => !allowed.includes(a)).map((a) => show(a.address)),
    });
  }

  // Try each allowed address in turn; each attempt gets a fair share of the time left.
  let lastError: DshieldError | undefined;
  for (let k = 0; k < allowed.length; k++) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) break;
    const budget = Math.max(1, Math.floor(remaining / (allowed.length - k)));
    try {
      return await connectOnce(target, allowed[k]!, budget, cx);
    } catch (err) {
      if (!(err instanceof DshieldError) || err.code !== ErrorCodes.DESTINATION) throw err;
      lastError = err;
    }
  }
  throw lastError ?? destinationError(target, 'timeout', `did not connect within ${cx.timeoutMs} ms`);
}

function connectOnce(target: Target, to: Resolved, budgetMs: number, cx: ConnectContext): Promise<Socket> {
  return new Promise((resolve, reject) => {
    // An address literal as host: net.connect does no lookup of its own, so it connects to what was checked.
    // Pooled reads: a download's reads reuse a few buffers instead of fresh memory each (core/pooled-reads.ts).
    const socket = connectPooled({ host: to.address, port: target.port, family: to.family, noDelay: true });
    const listed = cx.attempts.add(socket);
    let settled = false;
    const finish = (err: DshieldError | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      unwatch?.();
      socket.removeListener('error', onError);
      socket.removeListener('connect', onConnect);
      socket.removeListener('close', onClose);
      cx.attempts.remove(listed);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        resolve(socket);
      }
    };
    const onConnect = () => {
      socket.setNoDelay(true);
      socket.setKeepAlive(true, 60_000);
      finish(null);
    };
    const onError = (err: NodeJS.ErrnoException) => {
      const reason = reasonForErrno(err.code);
      finish(destinationError(target, reason, `${reason === 'refused' ? 'refused the connection' : 'could not be reached'} (${show(to.address)}: ${err.code ?? err.message})`, err, { address: show(to.address), errno: err.code }));
    };
    const onClose = () => finish(new DshieldError(ErrorCodes.STREAM_RESET, `connection to ${target.host}:${target.port} was cancelled`));
    const onAbort = () => finish(new DshieldError(ErrorCodes.STREAM_RESET, `connection to ${target.host}:${target.port} was cancelled`));
    const timer = setTimeout(
      () => finish(destinationError(target, 'timeout', `did not answer within ${budgetMs} ms (${show(to.address)})`, undefined, { address: show(to.address) })),
      budgetMs,
    );
    socket.once('connect', onConnect);
    socket.on('error', onError);
    socket.once('close', onClose);
    // The server passes its runtime's signal: watched without a listener per connect (see core/abort-watch.ts).
    let unwatch: (() => void) | undefined;
    if (cx.signal?.aborted) onAbort();
    else if (cx.signal) unwatch = watchAbort(cx.signal, onAbort);
  });
}

// ---------------------------------------------------------------------------
// UDP

const DNS_CACHE_SIZE = 128;
const DNS_CACHE_TTL_MS = 30_000;
/** Datagrams held per name while its lookup runs. */
const QUEUE_PER_LOOKUP = 8;
/** Denials logged per association before going quiet (a flood must not flood the log). */
const DENIAL_LOG_LIMIT = 5;

/**
 * One UDP association: one socket per address family, opened on first use,
 * shared by every destination (a full-cone NAT from the client's view).
 * Replies from addresses the policy denies are dropped too.
 */
class DirectUdpRelay implements UdpRelay {
  private socket4: UdpSocket | undefined;
  private socket6: UdpSocket | undefined;
  private handler: ((from: Target, payload: Buffer) => void) | undefined;
  private closed = false;
  private denials = 0;
  /** name -> resolved address; Map order is insertion order, so the oldest entry goes first. */
  private readonly cache = new Map<string, { ip: IpAddress; address: string; expires: number }>();
  private readonly pending = new Map<string, { port: number; payload: Buffer }[]>();

  constructor(
    private readonly policy: EgressPolicy,
    private readonly log: Logger,
    private readonly maxPendingLookups: number,
    private readonly onClosed: () => void,
  ) {}

  send(target: Target, payload: Buffer): void {
    if (this.closed || payload.length > MAX_DATAGRAM) return;
    const port = target.port;
    if (!Number.isInteger(port) || port < 1 || port > 65535) return;
    const host = bareHost(target.host);
    const ip = parseIp(host);
    if (ip) {
      this.sendTo(ip, host, port, payload);
      return;
    }
    const cached = this.cache.get(host);
    if (cached && cached.expires > Date.now()) {
      this.sendTo(cached.ip, cached.address, port, payload);
      return;
    }
    const queue = this.pending.get(host);
    if (queue) {
      if (queue.length < QUEUE_PER_LOOKUP) queue.push({ port, payload });
      return;
    }
    if (this.pending.size >= this.maxPendingLookups || host.length > 253) return;
    this.pending.set(host, [{ port, payload }]);
    dnsLookup(host, { all: true }, (err, addresses) => {
      const waiting = this.pending.get(host) ?? [];
      this.pending.delete(host);
      if (this.closed) return;
      if (err || addresses.length === 0) {
        this.log.debug('udp: lookup failed; datagrams dropped', { host, error: err?.code });
        return;
      }
      // Prefer an allowed address; if none is allowed, sendTo logs the denial and drops.
      const parsed = addresses.map((a) => ({ address: a.address, ip: parseIp(a.address) })).filter((a) => a.ip !== null);
      const pick = parsed.find((a) => this.policy.checkIp(a.ip!)) ?? parsed[0];
      if (!pick) return;
      if (this.cache.size >= DNS_CACHE_SIZE) this.cache.delete(this.cache.keys().next().value!);
      this.cache.set(host, { ip: pick.ip!, address: pick.address, expires: Date.now() + DNS_CACHE_TTL_MS });
      for (const d of waiting) this.sendTo(pick.ip!, pick.address, d.port, d.payload);
    });
  }

  private sendTo(ip: IpAddress, address: string, port: number, payload: Buffer): void {
    if (this.closed) return;
    // Checked at send time on the literal address the datagram goes to.
    if (!this.policy.checkIp(ip)) {
      if (this.denials++ < DENIAL_LOG_LIMIT) {
        this.log.debug('udp: datagram dropped by the egress policy', { to: `${show(address)}:${port}` });
      }
      return;
    }
    const socket = this.socketFor(ip.family);
    if (!socket) return;
    socket.send(payload, port, address, (err) => {
      if (err) this.log.debug('udp: send failed', { to: `${show(address)}:${port}`, error: (err as NodeJS.ErrnoException).code });
    });
  }

  private socketFor(family: 4 | 6): UdpSocket | undefined {
    const existing = family === 4 ? this.socket4 : this.socket6;
    if (existing) return existing;
    let socket: UdpSocket;
    try {
      socket = createSocket(family === 4 ? { type: 'udp4' } : { type: 'udp6', ipv6Only: true });
    } catch (err) {
      this.log.debug('udp: cannot create a socket', { family, error: (err as Error).message });
      return undefined;
    }
    socket.on('error', (err) => this.log.debug('udp: socket error', { family, error: err.message }));
    socket.on('message', (msg, rinfo) => {
      if (this.closed || !this.handler) return;
      if (!this.policy.check(rinfo.address)) return;
      this.handler({ host: show(rinfo.address), port: rinfo.port }, msg);
    });
    if (family === 4) this.socket4 = socket;
    else this.socket6 = socket;
    return socket;
  }

  onMessage(handler: (from: Target, payload: Buffer) => void): void {
    this.handler = handler;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.handler = undefined;
    this.pending.clear();
    this.cache.clear();
    for (const s of [this.socket4, this.socket6]) {
      try {
        s?.close();
      } catch {
        // already closed
      }
    }
    this.socket4 = this.socket6 = undefined;
    this.onClosed();
  }
}
