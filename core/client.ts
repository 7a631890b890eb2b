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
 */
import { connectSession, type Session } from './session.ts';
import { Mux, STREAM_WINDOW } from './mux.ts';
import { decodeKey } from './keys.ts';
import { DshieldError, ErrorCodes } from './errors.ts';
import { loadCommonPlugins, staticKeyFrom, type CommonPlugins, type Runtime } from './runtime.ts';
import type { Duplex } from 'node:stream';
import type { InboundPlugin, Target, Tunnel, TunnelUdp } from './types.ts';

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
}

export async function startClient(rt: Runtime, opts: ClientOptions = {}): Promise<ClientHandle> {
  const { config, events } = rt;
  const log = rt.log.child('client');
  const plugins = await loadCommonPlugins(rt, 'client');
  const server = opts.server ?? config.client.server;
  const connection = new Connection(rt, plugins, server);

  opts.onConnecting?.(server);
  events.emit('client:connecting', { attempt: 1, server });
  await connection.connectFirst();

  const tunnel = connection.tunnel();
  const inbounds: InboundPlugin[] = [];
  const addresses: string[] = [];
  try {
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

  constructor(
    private readonly rt: Runtime,
    private readonly plugins: CommonPlugins,
    private readonly server: string,
  ) {
    this.log = rt.log.child('client');
  }

  async connectFirst(): Promise<void> {
    this.up(await this.connectOnce());
    this.startKeepalive();
  }

  private async connectOnce(): Promise<Live> {
    const { config } = this.rt;
    const { transport, cipher, auth, hash } = this.plugins;
    const link = await transport.dial(this.server, this.rt.signal);
    const session = await connectSession(link, {
      cipher,
      hash,
      staticKey: staticKeyFrom(config.client.privateKey, 'client.privateKey'),
      serverPublicKey: decodeKey(config.client.serverPublicKey, 'client.serverPublicKey'),
      psk: auth.psk(),
      payload: {},
      handshakeTimeoutMs: config.client.handshakeTimeout,
      log: this.log.child('session'),
    });
    const mux = new Mux({
      side: 'client',
      send: (payload) => session.send(payload),
      maxPayload: session.maxPayload,
      initialWindow: STREAM_WINDOW,
      log: this.log.child('mux'),
      events: this.rt.events,
    });
    return { session, mux };
  }

  private up(live: Live): void {
    const { session, mux } = live;
    const started = Date.now();
    this.live = live;
    this.attempt = 0;
    this.rt.events.emit('session:up', { side: 'client', remote: session.remoteAddress });
    session.start({
      message: (payload) => mux.receive(payload),
      drain: () => mux.drain(),
      close: (err) => {
        mux.close(err);
        if (this.live === live) this.live = undefined;
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
    for (const w of this.waiters) w.resolve(live);
    this.waiters.clear();
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
      openStream: async (target: Target): Promise<Duplex> => {
        const { mux } = await this.current();
        return mux.openStream(target, this.rt.signal);
      },
      openUdp: (): TunnelUdp => new ReconnectingUdp(this),
    };
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

function tunnelDown(message: string): DshieldError {
  return new DshieldError(ErrorCodes.TUNNEL_DOWN, message);
}
