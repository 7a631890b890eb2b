/**
 * Client mode.
 *
 *   inbound (socks5, http) -> Tunnel.openStream -> Mux stream -> Session -> Link -> server
 *
 * The client keeps one session up. The first connection must succeed (its
 * failure is the user's to fix: a wrong address, a key that does not match);
 * after that, a lost session is re-established with backoff (1 s doubling to
 * 30 s) while new streams wait up to `client.connectWait` for it. A keepalive
 * ping on an idle tunnel keeps NAT mappings open and notices a dead link.
 * Over a datagram transport (udp) each connect binds a fresh endpoint and
 * runs core/session-datagram.ts; its mux is lossy (no streams), so
 * client.http is refused at start-up and SOCKS5 serves UDP ASSOCIATE only.
 *
 * TUN mode (client.tun): the server's address is resolved once, before
 * anything else, and every (re)connect dials that address, so no DNS is
 * needed while the tunnel owns the resolver. The handshake asks for TUN
 * parameters ({ tun: true }); a session answered without them is refused.
 * The inbound-tun plugin gets the packet path as `tunnel.packets`.
 */
import { connectSession, type ClientHandshakeOptions, type Session } from './session.ts';
import { connectDatagramSession } from './session-datagram.ts';
import { bindForServer } from './datagram-dial.ts';
import { Mux, sendThrough, STREAM_WINDOW } from './mux.ts';
import { decodeKey } from './keys.ts';
import { DshieldError, ErrorCodes, isDshieldError } from './errors.ts';
import { parseHostPort } from './hostport.ts';
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { checkTunPrerequisites } from './tun/preflight.ts';
import { recoverLeftovers } from './tun/state.ts';
import { loadCommonPlugins, staticKeyFrom, type CommonPlugins, type Runtime } from './runtime.ts';
import type { Duplex } from 'node:stream';
import type { InboundPlugin, OpenStreamOptions, Target, Tunnel, TunnelPackets, TunnelUdp, TunOffload, TunParams } from './types.ts';

export const BACKOFF_START_MS = 1000;
export const BACKOFF_MAX_MS = 30_000;

export interface ClientHandle {
  /** What each inbound listens on, e.g. ["socks5://127.0.0.1:1080", "http://127.0.0.1:8080"]. */
  readonly inbounds: string[];
  /** The tunnel the inbounds use (also handy for tests and embedding). */
  readonly tunnel: Tunnel;
  /** True while a session is up. */
  readonly connected: boolean;
  /** Round-trip time of a ping through the tunnel, in ms. */
  ping(): Promise<number>;
  close(): Promise<void>;
}

export interface ClientOptions {
  /** Override config.client.server (local mode dials the in-process server). */
  server?: string;
  /** Called while the first connection is being made (the CLI's spinner). */
  onConnecting?(server: string): void;
}

interface Live {
  session: Session;
  mux: Mux;
  /** TUN mode: what the server assigned in this session's handshake. */
  tun?: TunParams;
}

export async function startClient(rt: Runtime, opts: ClientOptions = {}): Promise<ClientHandle> {
  const { config, events } = rt;
  const log = rt.log.child('client');
  const plugins = await loadCommonPlugins(rt, 'client');
  if (plugins.transport.type === 'datagram' && config.client.http !== false) {
    // Proxied TCP needs reliable streams; SOCKS5 stays on for UDP ASSOCIATE (its CONNECT gets "command not supported").
    throw new DshieldError(
      ErrorCodes.UNSUPPORTED,
      `client.http needs a stream transport (tcp or ws); with transport ${plugins.transport.name} set client.http to false`,
    );
  }
  const server = opts.server ?? config.client.server;
  const tunConfig = config.client.tun;
  if (tunConfig) {
    checkTunPrerequisites('client.tun');
    // A crashed run's resolv.conf or kill switch would break the lookup and the dial below: undo those first.
    for (const r of await recoverLeftovers(tunConfig.stateDir, { name: 'client' })) {
      log.warn(`undid what a crashed client (pid ${r.pid}) left behind: ${[...r.undone, ...r.notes].join('; ') || 'nothing'}`);
      for (const f of r.failed) log.error(`could not undo a crashed client's change: ${f}`);
    }
  }
  // TUN mode: resolve the server first, while the system resolver still works.
  const endpoint = tunConfig ? await resolveServer(server, plugins.transport.type) : undefined;
  const connection = new Connection(rt, plugins, server, endpoint);

  opts.onConnecting?.(server);
  events.emit('client:connecting', { attempt: 1, server });
  try {
    await connection.connectFirst();
  } catch (err) {
    if (tunConfig && isDshieldError(err, ErrorCodes.HANDSHAKE_TIMEOUT)) {
      throw new DshieldError(
        err.code,
        `${err.message} (client.tun is on: TUN mode also needs server.tun on the server, and a free address in its pool)`,
        { cause: err },
      );
    }
    throw err;
  }

  const tunnel = connection.tunnel();
  const inbounds: InboundPlugin[] = [];
  const addresses: string[] = [];
  try {
    if (tunConfig) {
      const { routes, ...rest } = tunConfig;
      const inbound = await rt.load('inbound', { use: 'tun', options: routes === null ? rest : { ...rest, routes } }, 'client');
      inbounds.push(inbound);
      const { address } = await inbound.start(tunnel);
      addresses.push(address);
    }
    for (const [name, setting] of [
      ['socks5', config.client.socks],
      ['http', config.client.http],
    ] as const) {
      if (setting === false) continue;
      const inbound = await rt.load('inbound', { use: name, options: { ...setting } }, 'client');
      inbounds.push(inbound);
      const { address } = await inbound.start(tunnel);
      addresses.push(address);
      events.emit('listening', { what: `${name} proxy`, address });
    }
  } catch (err) {
    for (const inbound of inbounds.reverse()) await inbound.close?.();
    await connection.close();
    throw err;
  }
  log.debug('client ready', { inbounds: addresses });

  return {
    inbounds: addresses,
    tunnel,
    get connected() {
      return connection.live !== undefined;
    },
    ping: () => connection.ping(),
    async close() {
      for (const inbound of inbounds) await inbound.close?.();
      await connection.close();
    },
  };
}

/** Keeps one session to the server up, and hands out its mux to waiters. */
class Connection {
  live: Live | undefined;
  private closed = false;
  private attempt = 0;
  private waiters = new Set<{ resolve(l: Live): void; reject(e: Error): void }>();
  private retryTimer: NodeJS.Timeout | undefined;
  private keepaliveTimer: NodeJS.Timeout | undefined;
  private readonly log;

  /** TUN mode: the packet handler inbound-tun registered, and its session listeners. */
  private packetHandler: ((packet: Buffer) => void) | undefined;
  /** The TUN a packet thread may write packets into (TunnelPackets.offloadTo), and how to stop the current session doing so. */
  private offloadTun: TunOffload | undefined;
  private stopOffload: (() => void) | undefined;
  private readonly upHandlers: Array<(params: TunParams) => void> = [];
  private readonly downHandlers: Array<(reason: string) => void> = [];
  private lastTun: TunParams | undefined;
  /** What to dial: the server as configured, or in TUN mode its resolved address. */
  private readonly dialAddress: string;

  constructor(
    private readonly rt: Runtime,
    private readonly plugins: CommonPlugins,
    private readonly server: string,
    /** TUN mode: the server's resolved endpoint. */
    private readonly endpoint?: ServerEndpoint,
  ) {
    this.log = rt.log.child('client');
    this.dialAddress = endpoint?.dial ?? server;
  }

  async connectFirst(): Promise<void> {
    this.up(await this.connectOnce());
    this.startKeepalive();
  }

  private async connectOnce(): Promise<Live> {
    const { config } = this.rt;
    const { transport, cipher, auth, hash } = this.plugins;
    const handshake: ClientHandshakeOptions = {
      cipher,
      hash,
      staticKey: staticKeyFrom(config.client.privateKey, 'client.privateKey'),
      serverPublicKey: decodeKey(config.client.serverPublicKey, 'client.serverPublicKey'),
      psk: auth.psk(),
      payload: this.endpoint ? { tun: true } : {},
      handshakeTimeoutMs: config.client.handshakeTimeout,
      log: this.log.child('session'),
    };
    let session: Session;
    if (transport.type === 'datagram') {
      const bound = await bindForServer(transport, this.dialAddress, this.rt.signal);
      session = await connectDatagramSession(bound.endpoint, bound.server, handshake);
    } else {
      session = await connectSession(await transport.dial(this.dialAddress, this.rt.signal), handshake);
    }
    let tun: TunParams | undefined;
    if (this.endpoint) {
      tun = tunParamsFrom(session.params.tun);
      if (!tun) {
        session.destroy();
        throw new DshieldError(ErrorCodes.TUN, 'the server accepted the tunnel but assigned no TUN address: it runs without TUN support (server.tun); turn client.tun off or update the server');
      }
    }
    const mux = new Mux({
      side: 'client',
      ...sendThrough(session),
      maxPayload: session.maxPayload,
      initialWindow: STREAM_WINDOW,
      lossy: session.lossy === true,
      log: this.log.child('mux'),
      events: this.rt.events,
      ...(tun ? { onPacket: (packet: Buffer) => this.packetHandler?.(packet), maxPacket: tun.mtu } : {}),
    });
    return tun ? { session, mux, tun } : { session, mux };
  }

  private up(live: Live): void {
    const { session, mux } = live;
    const started = Date.now();
    this.live = live;
    this.attempt = 0;
    const reconnect = this.lastTun !== undefined;
    if (live.tun) this.lastTun = live.tun;
    this.rt.events.emit('session:up', { side: 'client', remote: session.remoteAddress });
    if (reconnect && live.tun) for (const h of this.upHandlers) this.safely('TUN up handler', () => h(live.tun!));
    session.start({
      message: (payload) => mux.receive(payload),
      drain: () => mux.drain(),
      close: (err) => {
        mux.close(err);
        if (this.live === live) this.live = undefined;
        if (live.tun) for (const h of this.downHandlers) this.safely('TUN down handler', () => h(err?.message ?? 'closed'));
        this.rt.events.emit('session:down', {
          side: 'client',
          remote: session.remoteAddress,
          bytesIn: mux.bytesIn,
          bytesOut: mux.bytesOut,
          durationMs: Date.now() - started,
          reason: err?.message ?? 'closed',
        });
        if (!this.closed) this.scheduleReconnect(err?.message ?? 'the server closed the tunnel');
      },
    });
    this.offloadPackets(live);
    for (const w of this.waiters) w.resolve(live);
    this.waiters.clear();
  }

  /** Let `live`'s session write packets into the TUN from its packet thread, when the TUN asked for it. */
  private offloadPackets(live: Live): void {
    this.stopOffload?.();
    this.stopOffload = undefined;
    if (this.offloadTun === undefined || live.tun === undefined || this.live !== live) return;
    this.stopOffload = live.session.offloadPackets?.({ ...this.offloadTun, maxPacket: live.tun.mtu });
  }

  private scheduleReconnect(reason: string): void {
    this.attempt++;
    const delayMs = Math.min(BACKOFF_START_MS * 2 ** (this.attempt - 1), BACKOFF_MAX_MS);
    this.rt.events.emit('client:reconnect', { attempt: this.attempt, delayMs, reason });
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      if (this.closed) return;
      this.rt.events.emit('client:connecting', { attempt: this.attempt + 1, server: this.server });
      this.connectOnce().then(
        (live) => {
          if (this.closed) live.session.destroy();
          else this.up(live);
        },
        (err: Error) => {
          if (!this.closed) this.scheduleReconnect(err.message);
        },
      );
    }, delayMs);
  }

  /** The current session's mux, or wait (bounded by client.connectWait) for the next one. */
  current(): Promise<Live> {
    if (this.live) return Promise.resolve(this.live);
    if (this.closed) return Promise.reject(tunnelDown('the client is shutting down'));
    const waitMs = this.rt.config.client.connectWait;
    return new Promise((resolve, reject) => {
      const waiter = {
        resolve: (l: Live) => {
          clearTimeout(timer);
          resolve(l);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(tunnelDown(`the tunnel to ${this.server} is down and did not come back within ${waitMs} ms`));
      }, waitMs);
      this.waiters.add(waiter);
    });
  }

  tunnel(): Tunnel {
    return {
      openStream: async (target: Target, options?: OpenStreamOptions): Promise<Duplex> => {
        const { mux } = await this.current();
        return mux.openStream(target, this.rt.signal, options?.early === true);
      },
      openUdp: (): TunnelUdp => new ReconnectingUdp(this),
      ...(this.endpoint ? { packets: this.packets(this.endpoint) } : {}),
    };
  }

  private packets(endpoint: ServerEndpoint): TunnelPackets {
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const connection = this;
    return {
      server: { ip: endpoint.ip, port: endpoint.port, protocol: endpoint.protocol },
      get params(): TunParams {
        return connection.lastTun!;
      },
      get up(): boolean {
        return connection.live !== undefined;
      },
      send(packet: Uint8Array, alone?: boolean): boolean {
        const live = connection.live;
        return live !== undefined && live.mux.sendPacket(packet, alone);
      },
      onPacket(handler: (packet: Buffer) => void): void {
        connection.packetHandler = handler;
      },
      offloadTo(tun: TunOffload): () => void {
        connection.offloadTun = tun;
        if (connection.live !== undefined) connection.offloadPackets(connection.live);
        return () => {
          if (connection.offloadTun !== tun) return;
          connection.offloadTun = undefined;
          connection.stopOffload?.();
          connection.stopOffload = undefined;
        };
      },
      onUp(handler: (params: TunParams) => void): void {
        connection.upHandlers.push(handler);
      },
      onDown(handler: (reason: string) => void): void {
        connection.downHandlers.push(handler);
      },
    };
  }

  /** Runs a plugin's listener; a throw is logged, never propagated into the session's callbacks. */
  private safely(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.error(`${what} threw: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  async ping(): Promise<number> {
    const { mux } = await this.current();
    return mux.ping();
  }

  private startKeepalive(): void {
    const interval = this.rt.config.client.keepalive;
    if (interval <= 0) return;
    this.keepaliveTimer = setInterval(() => {
      const live = this.live;
      if (!live || Date.now() - live.mux.lastActivity < interval) return;
      live.mux.ping(Math.max(interval, 10_000)).catch(() => {
        if (this.live === live) live.session.destroy(tunnelDown('keepalive ping got no answer'));
      });
    }, Math.max(250, Math.floor(interval / 2)));
    this.keepaliveTimer.unref();
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.keepaliveTimer);
    for (const w of this.waiters) w.reject(tunnelDown('the client is shutting down'));
    this.waiters.clear();
    this.live?.session.close();
    this.live = undefined;
  }
}

/**
 * A UDP association that survives reconnects: it binds to the current
 * session's mux on first use and again after the session changes.
 * Datagrams sent while the tunnel is down are dropped, as UDP allows.
 */
class ReconnectingUdp implements TunnelUdp {
  private inner: { mux: Mux; udp: TunnelUdp } | undefined;
  private handler: ((from: Target, payload: Buffer) => void) | undefined;
  private closed = false;

  constructor(private readonly connection: Connection) {}

  send(target: Target, payload: Buffer): void {
    if (this.closed) return;
    const live = this.connection.live;
    if (!live) return;
    let inner = this.inner;
    if (inner?.mux !== live.mux) {
      inner?.udp.close();
      const udp = live.mux.openUdp();
      if (this.handler) udp.onMessage(this.handler);
      inner = this.inner = { mux: live.mux, udp };
    }
    inner.udp.send(target, payload);
  }

  onMessage(handler: (from: Target, payload: Buffer) => void): void {
    this.handler = handler;
    this.inner?.udp.onMessage(handler);
  }

  close(): void {
    this.closed = true;
    this.inner?.udp.close();
    this.inner = undefined;
  }
}

/** Where the client dials in TUN mode: the server's address, resolved once. */
interface ServerEndpoint {
  ip: string;
  port: number;
  protocol: 'tcp' | 'udp';
  /** The address handed to transport.dial. */
  dial: string;
}

/**
 * Resolve the configured server ("host:port" or a ws:// / wss:// URL) to an
 * IP address. "host:port" is dialed as "ip:port" from then on; a URL keeps its
 * host name (TLS and the Host header need it), so a ws server named by a
 * host name needs DNS on each reconnect.
 */
async function resolveServer(server: string, transportType: 'stream' | 'datagram'): Promise<ServerEndpoint> {
  const protocol = transportType === 'datagram' ? 'udp' : 'tcp';
  let host: string;
  let port: number;
  let isUrl = false;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(server)) {
    const url = new URL(server);
    host = url.hostname.replace(/^\[|\]$/g, '');
    port = url.port ? Number(url.port) : url.protocol === 'wss:' ? 443 : 80;
    isUrl = true;
  } else {
    ({ host, port } = parseHostPort(server, 'client.server'));
  }
  let ip = host;
  if (isIP(host) === 0) {
    try {
      ip = (await lookup(host)).address;
    } catch (err) {
      throw new DshieldError(ErrorCodes.UNREACHABLE, `cannot resolve the server's name ${host}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, { cause: err });
    }
  }
  const dial = isUrl ? server : isIP(ip) === 6 ? `[${ip}]:${port}` : `${ip}:${port}`;
  return { ip, port, protocol, dial };
}

/** The `tun` object of a handshake response, checked; undefined when absent or malformed. */
function tunParamsFrom(value: unknown): TunParams | undefined {
  if (typeof value !== 'object' || value === null) return undefined;
  const v = value as Record<string, unknown>;
  const cidrish = (x: unknown): x is string => typeof x === 'string' && /^[0-9a-fA-F:.]+\/\d{1,3}$/.test(x) && isIP(x.split('/')[0]!) !== 0;
  if (!cidrish(v.address) || isIP(v.address.split('/')[0]!) !== 4) return undefined;
  if (v.address6 !== undefined && (!cidrish(v.address6) || isIP(v.address6.split('/')[0]!) !== 6)) return undefined;
  if (typeof v.mtu !== 'number' || !Number.isInteger(v.mtu) || v.mtu < 576 || v.mtu > 65535) return undefined;
  const dns = Array.isArray(v.dns) ? v.dns.filter((d): d is string => typeof d === 'string' && isIP(d) !== 0) : [];
  const params: TunParams = { address: v.address, dns, mtu: v.mtu };
  if (v.address6 !== undefined) params.address6 = v.address6 as string;
  return params;
}

function tunnelDown(message: string): DshieldError {
  return new DshieldError(ErrorCodes.TUNNEL_DOWN, message);
}
