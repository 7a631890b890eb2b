/**
 * The server's side of TUN mode (server.tun): one TUN device for all
 * clients, an address per client from the pool (leases.ts), forwarding and
 * masquerading (nftables) so destinations see the server's address.
 *
 *   client session -> Mux PACKET -> check source = the client's lease -> TUN -> kernel -> NAT -> internet
 *   internet -> kernel -> TUN -> destination's host number -> that client's Mux PACKET -> client
 *
 * The egress policy of proxy mode applies to forwarded packets too, in the
 * kernel (nft.ts): the default deny list minus server.egress.allow, with DNS
 * to the resolvers handed to clients always allowed. Anti-spoofing is exact
 * in userspace (each session may only send from its own address) and coarse
 * in nftables (only pool addresses may come out of the TUN).
 *
 * Everything changed on the system goes through NetChanges (journaled, so a
 * crashed server's leftovers are undone by the next start) and is undone by
 * close().
 */
import { DEFAULT_EGRESS_DENY } from './cidr.ts';
import { DshieldError, ErrorCodes, isDshieldError } from './errors.ts';
import { NO_VNET_HEADER_NOTE, openTun, type TunDevice } from './tun/device.ts';
import { LeasePool, type Lease } from './tun/leases.ts';
import { NetChanges } from './tun/netconfig.ts';
import { runCommand } from './tun/command.ts';
import { checkTunPrerequisites } from './tun/preflight.ts';
import type { Mux } from './mux.ts';
import type { PacketSink } from './session.ts';
import type { ClientIdentity, Logger, ServerTunConfig, TunParams } from './types.ts';

export interface ServerTun {
  /** The device name the kernel gave the TUN. */
  readonly device: string;
  /** The server's own pool address ("10.66.0.1/24"). */
  readonly address: string;
  /** The TUN MTU: no packet either way is larger. */
  readonly mtu: number;
  /**
   * The TUN parameters for `client`, leasing its address (the same one every
   * time). `isGone(name)` says whether another name's lease may be taken over
   * when the pool is full. Throws DshieldError(TUN) when the pool is full.
   */
  lease(client: string, isGone?: (name: string) => boolean): { lease: Lease; params: TunParams };
  /**
   * Connect a client's session to the packet path: its packets go to the TUN
   * (if their source is its address), packets for its address go to it. A
   * newer session of the same client replaces an older one. Returns the
   * detach function (idempotent), the handler for the mux's onPacket, and
   * where a packet thread may write the client's packets itself
   * (Session.offloadPackets: the same source check, done there).
   */
  attach(lease: Lease, mux: () => Mux | undefined): { onPacket(packet: Buffer): void; detach(): void; sink: PacketSink };
  /** Counters for logs and tests (of the packets this thread handles; a packet thread's are the session's). */
  stats(): { spoofed: number; noRoute: number; tunDropped: number; toTun: number; fromTun: number };
  /** Undo every system change and remove the device. Idempotent. */
  close(): Promise<void>;
}

export interface ServerTunOptions {
  config: ServerTunConfig;
  /** server.egress.allow: ranges exempt from the default deny list. */
  egressAllow: readonly string[];
  log: Logger;
}

/**
 * Set TUN mode up: recover a crashed run's leftovers, open the device with
 * the pool's first address, turn forwarding on, install the NAT/forward
 * rules. Throws DshieldError(TUN/UNSUPPORTED) with one line (no root, no
 * /dev/net/tun, not Linux, a command failed); whatever was done is undone first.
 */
export async function startServerTun(opts: ServerTunOptions): Promise<ServerTun> {
  const { config, log } = opts;
  checkTunPrerequisites('server.tun');
  const pool = new LeasePool({ subnet: config.subnet, subnet6: config.subnet6 || undefined, file: config.leasesFile });
  let net: NetChanges | undefined;
  let dev: TunDevice | undefined;
  try {
    net = await NetChanges.start({ stateDir: config.stateDir, name: 'server' });
    for (const r of net.recovered) log.warn(`undid what a crashed server (pid ${r.pid}) left behind: ${r.undone.join(', ') || 'nothing'}`);
    dev = await openTun({ name: config.name, mtu: config.mtu });
    if (!dev.vnetHeader) log.info(NO_VNET_HEADER_NOTE);
    await net.trackDevice(dev.name);
    await net.addAddress(dev.name, pool.serverAddress);
    if (pool.serverAddress6) await net.addAddress(dev.name, pool.serverAddress6);
    await net.linkUp(dev.name);
    await net.enableForwarding({ ipv6: config.subnet6 !== '' });
    const egressDev = await defaultRouteDevice();
    await net.serverNat({
      tunDev: dev.name,
      subnet: config.subnet,
      subnet6: config.subnet6 || undefined,
      egressDev,
      clientToClient: config.clientToClient,
      nat: config.nat,
      egress: { deny: DEFAULT_EGRESS_DENY, allow: opts.egressAllow },
      dns: config.dns,
    });
    log.info(
      `TUN ${dev.name} up: ${pool.serverAddress}${pool.serverAddress6 ? ` ${pool.serverAddress6}` : ''}, ` +
        `${config.nat ? `masquerading out of ${egressDev ?? 'any interface'}` : 'no NAT'}, mtu ${config.mtu}`,
    );
  } catch (err) {
    const errors = (await net?.undoAll()) ?? [];
    for (const e of errors) log.error(e.message);
    await dev?.close().catch(() => undefined);
    throw asTunError(err);
  }
  return new PacketRouter(config, pool, net, dev, log);
}

/**
 * The server's handshake responder (ServerAcceptOptions.respond) for TUN
 * mode. A client whose initiation says { tun: true } gets { v: 1, tun:
 * TunParams } with its leased address; without TUN on this server, or with
 * the pool full, it throws (the session layer then stays silent, as for any
 * refused handshake) after logging why at warn. Others get { v: 1 }.
 */
export function tunHandshakeResponder(
  tun: Pick<ServerTun, 'lease'> | undefined,
  log: Logger,
  isGone?: (name: string) => boolean,
): (identity: ClientIdentity, init: Record<string, unknown>) => Record<string, unknown> {
  return (identity, init) => {
    if (init.tun !== true) return { v: 1 };
    if (!tun) {
      log.warn(`refused "${identity.name}": it asks for TUN mode (client.tun) but this server has no server.tun`);
      throw new DshieldError(ErrorCodes.TUN, 'TUN mode requested but server.tun is off');
    }
    try {
      return { v: 1, tun: tun.lease(identity.name, isGone).params };
    } catch (err) {
      log.warn(`refused "${identity.name}": ${err instanceof Error ? err.message : String(err)}`);
      throw err;
    }
  };
}

/** The interface of the IPv4 default route, or undefined when there is none (masquerade out of any but the TUN). */
async function defaultRouteDevice(): Promise<string | undefined> {
  try {
    const { stdout } = await runCommand('ip', ['-4', '-j', 'route', 'show', 'default']);
    const routes = JSON.parse(stdout) as Array<{ dev?: string }>;
    return routes.find((r) => typeof r.dev === 'string')?.dev;
  } catch {
    return undefined;
  }
}

function asTunError(err: unknown): DshieldError {
  if (isDshieldError(err)) return err;
  return new DshieldError(ErrorCodes.TUN, `server.tun setup failed: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
}

interface Route {
  lease: Lease;
  mux: () => Mux | undefined;
}

class PacketRouter implements ServerTun {
  /** host number -> the session owning that address. */
  private readonly routes = new Map<number, Route>();
  private readonly counters = { spoofed: 0, noRoute: 0, tunDropped: 0, toTun: 0, fromTun: 0 };
  private closing: Promise<void> | undefined;

  constructor(
    private readonly config: ServerTunConfig,
    private readonly pool: LeasePool,
    private readonly net: NetChanges,
    private readonly dev: TunDevice,
    private readonly log: Logger,
  ) {
    dev.onPacket((packet, alone) => this.fromTun(packet, alone));
    dev.onError((err) => log.error(`the TUN device failed: ${err.message}; TUN clients get no packets until the server restarts`));
  }

  get device(): string {
    return this.dev.name;
  }

  get address(): string {
    return this.pool.serverAddress;
  }

  get mtu(): number {
    return this.dev.mtu;
  }

  lease(client: string, isGone?: (name: string) => boolean): { lease: Lease; params: TunParams } {
    const lease = this.pool.lease(client, isGone);
    const params: TunParams = { address: lease.address, dns: [...this.config.dns], mtu: this.config.mtu };
    if (lease.address6) params.address6 = lease.address6;
    return { lease, params };
  }

  attach(lease: Lease, mux: () => Mux | undefined): { onPacket(packet: Buffer): void; detach(): void; sink: PacketSink } {
    const route: Route = { lease, mux };
    const previous = this.routes.get(lease.host);
    if (previous && previous.lease.name !== lease.name) {
      this.log.warn(`address ${lease.ip} moves from "${previous.lease.name}" to "${lease.name}"`);
    }
    this.routes.set(lease.host, route);
    const word = ipv4Word(lease.ip);
    const host = lease.host;
    const onPacket = (packet: Buffer): void => this.toTun(route, word, host, packet);
    const detach = (): void => {
      if (this.routes.get(host) === route) this.routes.delete(host);
    };
    const sink: PacketSink = {
      fd: this.dev.fd,
      source4: lease.ip,
      maxPacket: this.dev.mtu,
      readBack: (packet) => this.fromTun(packet, true),
      lendReader: (hooks) => this.dev.lendReader(hooks),
    };
    if (lease.ip6 !== undefined) sink.source6 = lease.ip6;
    return { onPacket, detach, sink };
  }

  /** A packet from a client: only from its own address, then into the kernel. */
  private toTun(route: Route, word: number, host: number, packet: Buffer): void {
    if (!this.sourceIsLease(packet, word, host)) {
      this.counters.spoofed++;
      // Debug only: a misbehaving client must not be able to flood the log at a visible level.
      if (this.counters.spoofed % 1000 === 1) {
        this.log.debug(`dropped packets from "${route.lease.name}" whose source is not ${route.lease.ip}`, { count: this.counters.spoofed });
      }
      return;
    }
    if (this.dev.write(packet)) this.counters.toTun++;
    else this.counters.tunDropped++;
  }

  private sourceIsLease(packet: Buffer, word: number, host: number): boolean {
    const version = packet.length > 0 ? packet[0]! >> 4 : 0;
    if (version === 4) return packet.length >= 20 && packet.readUInt32BE(12) === word;
    if (version === 6) return packet.length >= 40 && this.pool.hostOf6(packet, 8) === host;
    return false;
  }

  /** A packet from the kernel: to the session that owns the destination address. */
  private fromTun(packet: Buffer, alone: boolean): void {
    const version = packet.length > 0 ? packet[0]! >> 4 : 0;
    let host = -1;
    if (version === 4 && packet.length >= 20) host = this.pool.hostOf4(packet.readUInt32BE(16));
    else if (version === 6 && packet.length >= 40) host = this.pool.hostOf6(packet, 24);
    const mux = host >= 0 ? this.routes.get(host)?.mux() : undefined;
    if (!mux) {
      this.counters.noRoute++;
      return;
    }
    // sendPacket copies: the TUN's buffer is only valid during this call.
    if (mux.sendPacket(packet, alone)) this.counters.fromTun++;
  }

  stats() {
    return { ...this.counters };
  }

  close(): Promise<void> {
    this.closing ??= (async () => {
      this.routes.clear();
      // Rules and addresses first (their undo names the device), then the device.
      const errors = await this.net.undoAll();
      for (const e of errors) this.log.error(e.message);
      await this.dev.close().catch((err: unknown) => this.log.warn(`closing the TUN device: ${(err as Error).message}`));
      if (errors.length === 0) this.log.debug('TUN mode undone (rules, forwarding, device)');
    })();
    return this.closing;
  }
}

function ipv4Word(ip: string): number {
  const parts = ip.split('.').map(Number);
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}
