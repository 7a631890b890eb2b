/**
 * Server mode.
 *
 *   transport.listen -> Link -> acceptSession (Noise IK, auth, silence on failure)
 *   (datagram transport: transport.bind -> endpoint -> acceptDatagramSessions)
 *     -> Session -> Mux -> OpenRequest -> outbound.connect(target) -> splice(stream, socket)
 *                       -> UdpAssociation -> outbound.udp() relay
 *
 * One Mux per session. Sessions are logged (client name, address, bytes,
 * duration) through the event bus. Shutdown stops accepting, lets open
 * streams finish for up to `drainMs`, then closes what is left.
 */
import { acceptSession, ReplayGuard, type ServerAcceptOptions, type Session } from './session.ts';
import { acceptDatagramSessions } from './session-datagram.ts';
import { Mux, sendThrough, STREAM_WINDOW } from './mux.ts';
import { splice } from './splice.ts';
import { Roster } from './roster.ts';
import { loadCommonPlugins, staticKeyFrom, type Runtime } from './runtime.ts';
import { readClientsFile } from './config.ts';
import { isDshieldError } from './errors.ts';
import { startServerTun, tunHandshakeResponder, type ServerTun } from './server-tun.ts';
import { watchFile, unwatchFile } from 'node:fs';
import type { AuthPlugin, ClientIdentity, Logger, OutboundPlugin, TransportListener } from './types.ts';

export interface ServerHandle {
  /** The bound transport address ("host:port"). */
  readonly address: string;
  /** The server's static public key, base64. */
  readonly publicKey: string;
  /** Sessions currently up. */
  readonly sessions: number;
  /** Stop accepting, let streams finish for up to drainMs (default 5000), then close everything. */
  close(drainMs?: number): Promise<void>;
}

export interface ServerOptions {
  /** Override config.server.listen (local mode binds an ephemeral loopback port). */
  listen?: string;
  /** Extra egress allow ranges on top of server.egress.allow (local mode's demo page). */
  outbound?: OutboundPlugin;
}

interface LiveSession {
  session: Session;
  mux: Mux;
}

export async function startServer(rt: Runtime, opts: ServerOptions = {}): Promise<ServerHandle> {
  const { config, events } = rt;
  const log = rt.log.child('server');
  const { transport, cipher, auth, hash } = await loadCommonPlugins(rt, 'server');
  const outbound = opts.outbound ?? (await rt.load('outbound', config.server.outbound, 'server'));
  const staticKey = staticKeyFrom(config.server.privateKey, 'server.privateKey');
  const replay = new ReplayGuard();
  const live = new Roster<LiveSession>();
  let accepting = true;
  // TUN mode first: a server that cannot set it up (no root) stops here, before listening.
  const tun: ServerTun | undefined = config.server.tun
    ? await startServerTun({ config: config.server.tun, egressAllow: config.server.egress.allow, log: log.child('tun') })
    : undefined;

  // Session parameters for the handshake response; throws (the handshake is refused, silently) when TUN mode cannot serve the client.
  const respond = tunHandshakeResponder(tun, log, (name) => leaseIsGone(name));
  /** When the pool is full, a lease may go to a new client if its owner is no longer authorized and not connected. */
  const leaseIsGone = (name: string): boolean => {
    if (live.values().some((s) => (s.session.peer as ClientIdentity).name === name)) return false;
    if (config.server.clients.some((c) => c.name === name)) return false;
    try {
      return !readClientsFile(config.server.clientsFile).some((c) => c.name === name);
    } catch {
      return false;
    }
  };

  /** A logger per client name, made once: one per session costs a few microseconds of every handshake. Bounded by the authorized names. */
  const peerLogs = new Map<string, Logger>();
  const peerLog = (name: string): Logger => {
    let peerLogger = peerLogs.get(name);
    if (peerLogger === undefined) peerLogs.set(name, (peerLogger = log.child(name)));
    return peerLogger;
  };

  const serve = (session: Session): void => {
    const peer = session.peer as ClientIdentity;
    const started = Date.now();
    // respond() leased the address already: this finds it.
    const packets = tun && session.params.tun === true ? tun.attach(tun.lease(peer.name).lease, () => mux) : undefined;
    const sink = sendThrough(session);
    // No `...spread` among these: V8 (Node 20) takes a slow path of ~2 µs for an object literal
    // that spreads one object and names more properties, and this runs once per handshake.
    const mux: Mux = new Mux({
      side: 'server',
      send: sink.send,
      payloadBuffer: sink.payloadBuffer,
      maxPayload: session.maxPayload,
      initialWindow: STREAM_WINDOW,
      lossy: session.lossy === true,
      log: peerLog(peer.name),
      events,
      client: peer.name,
      onOpen(req) {
        outbound.connect(req.target, rt.signal).then(
          (socket) => {
            void splice(req.accept(), socket);
          },
          (err: unknown) => req.reject(err),
        );
      },
      onUdp(assoc) {
        const relay = outbound.udp();
        assoc.onMessage((to, payload) => relay.send(to, payload));
        relay.onMessage((from, payload) => assoc.send(from, payload));
        assoc.onClose(() => relay.close());
      },
      onPacket: packets?.onPacket,
      maxPacket: packets ? tun!.mtu : undefined,
    });
    const entry = live.add({ session, mux });
    events.emit('session:up', { side: 'server', client: peer.name, remote: session.remoteAddress });
    // Methods, not arrow properties: tsx names each arrow property, a defineProperty per session.
    session.start({
      message(payload) {
        mux.receive(payload);
      },
      drain() {
        mux.drain();
      },
      close(err) {
        live.remove(entry);
        packets?.detach();
        mux.close(err);
        events.emit('session:down', {
          side: 'server',
          client: peer.name,
          remote: session.remoteAddress,
          bytesIn: mux.bytesIn,
          bytesOut: mux.bytesOut,
          durationMs: Date.now() - started,
          reason: err?.message,
        });
      },
    });
    // Over udp, the client's packets may go into the TUN from a packet thread, off the event loop.
    if (packets) session.offloadPackets?.(packets.sink);
  };

  // One options object for every connection: building one per connection cost microseconds of each handshake.
  const handshake: ServerAcceptOptions = {
    cipher,
    hash,
    staticKey,
    auth,
    replay,
    handshakeTimeoutMs: config.server.handshakeTimeout,
    log: log.child('handshake'),
    respond,
    onSession: serve,
    onRefused(reason, remote) {
      events.emit('session:refused', { remote, reason });
    },
  };
  const address = opts.listen ?? config.server.listen;
  // A datagram transport binds one endpoint for every client; its sessions are demultiplexed by index.
  const listening = (async (): Promise<TransportListener> =>
    transport.type === 'datagram'
      ? acceptDatagramSessions(await transport.bind(address), {
          ...handshake,
          handshakesPerSecond: config.server.handshakesPerSecond,
          handshakesPerSource: config.server.handshakesPerSource,
        })
      : await transport.listen(address, (link) => {
          if (!accepting) {
            link.destroy();
            return;
          }
          acceptSession(link, handshake);
        }))();
  let listener: TransportListener;
  try {
    listener = await listening;
  } catch (err) {
    await tun?.close(); // the address is taken (say): leave the system as it was
    throw err;
  }
  events.emit('listening', { what: `server (${transport.name})`, address: listener.address });
  const stopWatching = watchClientsFile(rt, auth, log);

  let closing: Promise<void> | undefined;
  return {
    address: listener.address,
    publicKey: staticKey.publicKey.toString('base64'),
    get sessions() {
      return live.size;
    },
    close(drainMs = 5000) {
      closing ??= (async () => {
        accepting = false;
        stopWatching();
        await listener.close();
        await Promise.all(live.values().map((s) => s.mux.whenIdle(drainMs)));
        for (const s of live.values()) s.session.close();
        await tun?.close();
      })();
      return closing;
    },
  };
}

/**
 * `dshield invite` appends to server.clientsFile while the server may be
 * running: reload the authorized clients when that file changes. A broken
 * file is reported and the previous list stays in force.
 */
function watchClientsFile(rt: Runtime, auth: AuthPlugin, log: Logger): () => void {
  const file = rt.config.server.clientsFile;
  if (!auth.setClients || !file) return () => {};
  const fromFileAtStart = new Set(readClientsFile(file).map((c) => c.name));
  const fromConfig = rt.config.server.clients.filter((c) => !fromFileAtStart.has(c.name));
  const reload = () => {
    try {
      const fromFile = readClientsFile(file);
      auth.setClients!([...fromConfig, ...fromFile]);
      log.info(`reloaded ${file}: ${fromConfig.length + fromFile.length} authorized clients`);
    } catch (err) {
      log.warn(`not reloading ${file}: ${isDshieldError(err) ? err.message : String(err)}`);
    }
  };
  // Polling rather than fs.watch: it survives the atomic rename `invite` does.
  watchFile(file, { interval: 1000, persistent: false }, (now, before) => {
    if (now.mtimeMs !== before.mtimeMs || now.ino !== before.ino) reload();
  });
  return () => unwatchFile(file);
}
