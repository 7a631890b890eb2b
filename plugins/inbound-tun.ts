/**
 * inbound-tun: the full-device VPN on Linux (client.tun). Every packet the
 * routes send into a TUN device goes through the tunnel as an IP packet; the
 * server forwards it and masquerades it behind its own address.
 *
 * Start-up, in this order (each change journaled by NetChanges, so a crash
 * is undone by the next start, and undone newest first by close()):
 *   1. the TUN device, with the server's MTU;
 *   2. the kill switch (killSwitch: true): nftables lets out only loopback,
 *      the TUN and the server's ip:port, and stays on while the tunnel
 *      reconnects, so nothing leaks while it is down;
 *   3. the address(es) the server assigned, link up;
 *   4. a host route to the server through the current gateway (the tunnel's
 *      own packets stay on the real network), excluded ranges likewise, then
 *      0.0.0.0/1 + 128.0.0.0/1 (and ::/1 + 8000::/1 with an IPv6 address, or
 *      unreachable IPv6 routes so IPv6 cannot leak) or the chosen routes;
 *   5. resolv.conf pointing at the resolvers the server names (dns: true).
 * The device stays across reconnects (its routes would vanish with it);
 * packets are dropped while the tunnel is down.
 */
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes, isDshieldError } from '../core/errors.ts';
import { parseCidr } from '../core/cidr.ts';
import { NO_VNET_HEADER_NOTE, openTun, type TunDevice } from '../core/tun/device.ts';
import { NetChanges, type Undo } from '../core/tun/netconfig.ts';
import type { InboundPlugin, Logger, PluginContext, Tunnel, TunnelPackets, TunParams } from '../core/types.ts';

interface Options {
  name: string;
  routes?: string[];
  exclude: string[];
  dns: boolean;
  killSwitch: boolean;
  queues: number;
  stateDir: string;
  resolvConf: string;
}

const cidrList = (value: unknown): string | undefined => {
  for (const item of value as string[]) {
    try {
      parseCidr(item);
    } catch (err) {
      return isDshieldError(err) ? err.message : String(err);
    }
  }
  return undefined;
};

export default definePlugin<'inbound', Options>({
  kind: 'inbound',
  name: 'tun',
  description: 'full-device VPN on Linux: a TUN device, routes, DNS and an optional kill switch (client.tun)',
  modes: ['client'],
  options: {
    name: { type: 'string', description: 'device name, or a pattern with %d', default: 'dshield%d' },
    routes: { type: 'string[]', description: 'ranges to send through the tunnel (default: everything)', validate: cidrList },
    exclude: { type: 'string[]', description: 'ranges that keep using the real network', default: [], validate: cidrList },
    dns: { type: 'boolean', description: "use the server's resolvers while connected", default: true },
    killSwitch: { type: 'boolean', description: 'block everything but the tunnel and the server (nftables)', default: false },
    queues: { type: 'number', description: 'TUN queues', default: 1 },
    stateDir: { type: 'string', description: 'crash-recovery journal directory', default: '/var/lib/dshield' },
    resolvConf: { type: 'string', description: 'the resolver file to replace and restore', default: '/etc/resolv.conf' },
  },
  create(options, ctx) {
    return new TunInbound(options, ctx);
  },
});

class TunInbound implements InboundPlugin {
  readonly name = 'tun';
  private readonly log: Logger;
  private net: NetChanges | undefined;
  private dev: TunDevice | undefined;
  private addressUndo: Undo[] = [];
  private closing: Promise<void> | undefined;
  private dropped = 0;
  /** Stops the packet thread writing into the device (TunnelPackets.offloadTo). */
  private stopOffload: (() => void) | undefined;
  /** The parameters the device is set up with. */
  private current: TunParams | undefined;

  constructor(
    private readonly options: Options,
    ctx: PluginContext,
  ) {
    this.log = ctx.log;
  }

  async start(tunnel: Tunnel): Promise<{ address: string }> {
    const packets = tunnel.packets;
    if (!packets) throw new DshieldError(ErrorCodes.TUN, 'the tun inbound needs client.tun on (the tunnel has no packet path)');
    const params = packets.params;
    try {
      return await this.setUp(packets, params);
    } catch (err) {
      await this.close();
      throw err;
    }
  }

  private async setUp(packets: TunnelPackets, params: TunParams): Promise<{ address: string }> {
    const o = this.options;
    const net = (this.net = await NetChanges.start({ stateDir: o.stateDir, name: 'client' }));
    for (const r of net.recovered) this.log.warn(`undid what a crashed client (pid ${r.pid}) left behind: ${r.undone.join(', ') || 'nothing'}`);

    const dev = (this.dev = await openTun({ name: o.name, queues: o.queues, mtu: params.mtu }));
    dev.onError((err) => this.log.error(`the TUN device failed: ${err.message}`));
    if (!dev.vnetHeader) this.log.info(NO_VNET_HEADER_NOTE);
    await net.trackDevice(dev.name);

    const server = packets.server;
    if (o.killSwitch) {
      await net.killSwitch({ tunDev: dev.name, servers: [{ ip: server.ip, port: server.port, protocols: [server.protocol] }], allow: o.exclude });
    }
    await this.assign(net, dev.name, params);
    await net.linkUp(dev.name);

    if (!isLoopback(server.ip)) await net.routeToServer(server.ip);
    if (o.exclude.length > 0) await net.routeExcluded(o.exclude);
    const ipv6 = params.address6 !== undefined;
    if (o.routes === undefined) {
      await net.routeAllThrough(dev.name, { ipv6 });
      if (!ipv6) await net.blockIpv6();
    } else {
      const usable = o.routes.filter((r) => ipv6 || parseCidr(r).family === 4).flatMap(halves);
      if (o.routes.some((r) => parseCidr(r).family === 6) && !ipv6) this.log.warn('the server assigned no IPv6 address: the IPv6 routes in client.tun.routes are left out');
      // The resolvers must be reached through the tunnel too.
      const dns = o.dns ? params.dns.filter((d) => ipv6 || parseCidr(d).family === 4).map((d) => (d.includes(':') ? `${d}/128` : `${d}/32`)) : [];
      await net.routeIncluded(dev.name, [...usable, ...dns]);
    }
    if (o.dns && params.dns.length > 0) await net.setDns(params.dns, { path: o.resolvConf });

    // The data path: no await, no event bus. TUN -> tunnel copies (send copies); tunnel -> TUN copies into the ring.
    dev.onPacket((packet, alone) => {
      if (!packets.send(packet, alone)) this.dropped++;
    });
    packets.onPacket((packet) => {
      if (!dev.write(packet)) this.dropped++;
    });
    // Over udp, packets from the server may be written into the TUN by a packet thread instead.
    this.stopOffload = packets.offloadTo?.({
      fd: dev.fd,
      readBack: (packet) => {
        if (!packets.send(packet, true)) this.dropped++;
      },
      lendReader: (hooks) => dev.lendReader(hooks),
    });
    this.current = { ...params };
    packets.onUp((next) => void this.reconnected(next));
    packets.onDown(() => this.log.debug('tunnel down: TUN packets are dropped until it is back'));

    const what = [params.address, params.address6].filter(Boolean).join(' ');
    this.log.info(
      `TUN ${dev.name} up: ${what}, mtu ${params.mtu}, ${o.routes === undefined ? 'all traffic' : `routes ${o.routes.join(' ')}`}` +
        `${o.dns && params.dns.length > 0 ? `, DNS ${params.dns.join(' ')}` : ''}${o.killSwitch ? ', kill switch on' : ''}`,
    );
    return { address: `tun:${dev.name} ${what}` };
  }

  private async assign(net: NetChanges, dev: string, params: TunParams): Promise<void> {
    const undos = [await net.addAddress(dev, params.address)];
    if (params.address6) undos.push(await net.addAddress(dev, params.address6));
    this.addressUndo = undos;
  }

  /** A new session: the server normally assigns the same address; if not, follow it. */
  private async reconnected(next: TunParams): Promise<void> {
    const current = this.current;
    if (!current) return;
    if (next.mtu !== current.mtu) this.log.warn(`the server now says mtu ${next.mtu} (the device keeps ${current.mtu} until restart)`);
    if (next.address === current.address && next.address6 === current.address6) return;
    const net = this.net;
    const dev = this.dev;
    if (!net || !dev || this.closing) return;
    this.log.warn(`the server assigned a new address ${next.address} (was ${current.address}); re-addressing ${dev.name}`);
    try {
      for (const u of this.addressUndo) await u();
      await this.assign(net, dev.name, next);
      this.current = { ...current, address: next.address, address6: next.address6 };
    } catch (err) {
      this.log.error(`re-addressing ${dev.name} failed: ${(err as Error).message}`);
    }
  }

  /** Undo routes, DNS, kill switch and addresses (newest first), then remove the device. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const net = this.net;
      if (net) {
        const errors = await net.undoAll();
        for (const e of errors) this.log.error(e.message);
      }
      this.stopOffload?.();
      this.stopOffload = undefined;
      await this.dev?.close().catch((err: unknown) => this.log.warn(`closing the TUN device: ${(err as Error).message}`));
      if (this.dropped > 0) this.log.debug(`TUN packets dropped (tunnel down or congested): ${this.dropped}`);
    })();
    return this.closing;
  }
}

/** "0.0.0.0/0" and "::/0" as two halves, so they sit beside the default route instead of clashing with it. */
function halves(cidr: string): string[] {
  const c = parseCidr(cidr);
  if (c.prefix !== 0) return [cidr];
  return c.family === 4 ? ['0.0.0.0/1', '128.0.0.0/1'] : ['::/1', '8000::/1'];
}

function isLoopback(ip: string): boolean {
  return ip.startsWith('127.') || ip === '::1';
}
