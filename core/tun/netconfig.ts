/**
 * The system changes TUN mode makes — addresses, routes, DNS, kill switch,
 * forwarding and NAT — each recorded before it is applied and undone in
 * reverse order on exit (or, after a crash, by the next start: state.ts).
 *
 * Every method applies one change and returns its undo action; `undoAll()`
 * runs the outstanding ones newest first and keeps going past failures.
 * Commands are `ip` (iproute2) and `nft` (nftables) run with execFile and a
 * time bound (command.ts); nothing goes through a shell.
 *
 * A change that is already in place and not ours (an identical route the
 * user had) is left out of the undo list: we never remove what we did not add.
 *
 * Order matters for routing: call `routeToServer` (and `routeExcluded`)
 * before `routeAllThrough`, while `ip route get` still answers with the real
 * gateway.
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DshieldError, ErrorCodes } from '../errors.ts';
import { isExists, runCommand } from './command.ts';
import {
  KILL_SWITCH_TABLE,
  NAT_TABLE,
  canonicalCidr,
  canonicalIp,
  checkIfName,
  checkTableName,
  killSwitchScript,
  serverNatScript,
  type KillSwitchOptions,
  type ServerNatOptions,
} from './nft.ts';
import { RESOLV_CONF, resolvConfText, snapshotResolv, writeResolv, type ResolvRecord } from './resolv.ts';
import { DEFAULT_STATE_DIR, StateJournal, recoverLeftovers, type RecoveryReport } from './state.ts';
import { describeUndo, undo, type UndoRecord } from './undo.ts';

export type Undo = () => Promise<void>;

/** Where the kernel would send a packet for an address (from `ip -j route get`). */
export interface NextHop {
  family: 4 | 6;
  /** The gateway, or undefined when the address is on-link. */
  gateway?: string;
  dev: string;
  /** The source address the kernel would use. */
  src?: string;
}

/** Ask the kernel how it routes `ip` now. Throws DshieldError(TUN) when it has no route. */
export async function routeGet(ip: string): Promise<NextHop> {
  const addr = canonicalIp(ip);
  const { stdout } = await runCommand('ip', [addr.family === 6 ? '-6' : '-4', '-j', 'route', 'get', addr.text]);
  const routes = JSON.parse(stdout) as Array<{ gateway?: string; dev?: string; prefsrc?: string; type?: string }>;
  const r = routes[0];
  if (!r || !r.dev || (r.type !== undefined && r.type !== 'unicast')) {
    throw new DshieldError(ErrorCodes.TUN, `no route to ${addr.text} on this host`);
  }
  return { family: addr.family, gateway: r.gateway, dev: r.dev, src: r.prefsrc };
}

export interface NetChangesOptions {
  /** Journal to this directory for crash recovery (default /var/lib/dshield); false: no journal. */
  stateDir?: string | false;
  /** The instance's name in the state directory (default: "tun"). */
  name?: string;
}

export class NetChanges {
  private readonly journal: StateJournal | undefined;
  private readonly applied: UndoRecord[] = [];
  /** Reports of leftovers from dead runs that `start` undid. */
  readonly recovered: RecoveryReport[];

  private constructor(journal: StateJournal | undefined, recovered: RecoveryReport[]) {
    this.journal = journal;
    this.recovered = recovered;
  }

  /**
   * Undo what a crashed run of the same name left behind, then start a new
   * journal. Throws DshieldError(TUN) if another live instance owns the name,
   * or if a leftover could not be undone.
   */
  static async start(opts: NetChangesOptions = {}): Promise<NetChanges> {
    if (opts.stateDir === false) return new NetChanges(undefined, []);
    const dir = opts.stateDir ?? DEFAULT_STATE_DIR;
    const name = opts.name ?? 'tun';
    const recovered = await recoverLeftovers(dir, { name });
    const stuck = recovered.find((r) => r.failed.length > 0);
    if (stuck) {
      throw new DshieldError(ErrorCodes.TUN, `could not undo what a crashed run (pid ${stuck.pid}) left behind: ${stuck.failed[0]}`);
    }
    return new NetChanges(StateJournal.create(dir, name), recovered);
  }

  /** Outstanding changes, oldest first. */
  get records(): readonly UndoRecord[] {
    return this.applied;
  }

  /**
   * Record, apply, and return the undo. If apply fails, its partial effect is
   * undone too. `recoveryOnly`: the live run does not undo it (only a crash
   * recovery does), it just drops the record.
   */
  private async change(rec: UndoRecord, apply: () => Promise<boolean | void>, recoveryOnly = false): Promise<Undo> {
    this.journal?.add(rec);
    let keep: boolean | void;
    try {
      keep = await apply();
    } catch (err) {
      await undo(rec).catch(() => undefined);
      this.journal?.remove(rec);
      throw err;
    }
    if (keep === false) {
      // Already there and not ours: nothing to undo.
      this.journal?.remove(rec);
      return async () => {};
    }
    this.applied.push(rec);
    if (recoveryOnly) this.recoveryOnly.add(rec);
    return () => this.undoOne(rec);
  }

  private readonly recoveryOnly = new Set<UndoRecord>();

  private async undoOne(rec: UndoRecord): Promise<void> {
    const i = this.applied.lastIndexOf(rec);
    if (i < 0) return;
    if (!this.recoveryOnly.has(rec)) await undo(rec);
    this.applied.splice(i, 1);
    this.journal?.remove(rec);
  }

  /**
   * Undo every outstanding change, newest first, continuing past failures.
   * Resolves with what failed (empty when all is back as it was); the journal
   * is deleted only if nothing failed.
   */
  async undoAll(): Promise<Error[]> {
    const errors: Error[] = [];
    for (const rec of [...this.applied].reverse()) {
      try {
        await this.undoOne(rec);
      } catch (err) {
        errors.push(new DshieldError(ErrorCodes.TUN, `undoing ${describeUndo(rec)} failed: ${(err as Error).message}`, { cause: err }));
      }
    }
    if (errors.length === 0) this.journal?.finish();
    return errors;
  }

  // -------------------------------------------------------------------------
  // interface

  /**
   * Journal our TUN device, so a crash recovery deletes it if it outlived
   * the crash (only a persistent device can). The live run closes its device
   * itself (TunDevice.close): undoing this only drops the record.
   */
  async trackDevice(name: string): Promise<Undo> {
    checkIfName(name);
    return this.change({ kind: 'tun-device', name }, async () => {}, true);
  }

  /** `ip addr add CIDR dev DEV` (IPv4 or IPv6; e.g. "10.66.0.2/24", "fd66::2/64"). */
  async addAddress(dev: string, cidr: string): Promise<Undo> {
    checkIfName(dev);
    const addr = cidr.includes('/') ? cidr.slice(0, cidr.indexOf('/')) : cidr;
    const ip = canonicalIp(addr);
    const prefix = cidr.includes('/') ? canonicalCidr(cidr).text.split('/')[1]! : String(ip.family === 4 ? 32 : 128);
    const text = `${ip.text}/${prefix}`;
    return this.change({ kind: 'addr', dev, cidr: text }, async () => {
      const args = ['addr', 'add', text, 'dev', dev];
      if (ip.family === 6) args.push('nodad'); // usable at once: no duplicate detection on a point-to-point TUN
      try {
        await runCommand('ip', args);
      } catch (err) {
        if (isExists(err)) return false;
        throw err;
      }
    });
  }

  /** Set the MTU of a device we do not own (for our own TUN, use openTun's mtu). */
  async setMtu(dev: string, mtu: number): Promise<Undo> {
    checkIfName(dev);
    const previous = Number(readFileSync(`/sys/class/net/${dev}/mtu`, 'utf8').trim());
    return this.change({ kind: 'mtu', dev, mtu: previous }, async () => {
      await runCommand('ip', ['link', 'set', 'dev', dev, 'mtu', String(mtu)]);
    });
  }

  /** `ip link set DEV up`. Not journaled: the device goes away with its fds. */
  async linkUp(dev: string): Promise<void> {
    checkIfName(dev);
    await runCommand('ip', ['link', 'set', 'dev', dev, 'up']);
  }

  // -------------------------------------------------------------------------
  // routes

  /**
   * `ip route add CIDR [via GW] dev DEV [metric M]`. An identical route that
   * already exists is left alone (and not undone).
   */
  async addRoute(route: { to: string; dev: string; via?: string; metric?: number }): Promise<Undo> {
    const to = canonicalCidr(route.to);
    checkIfName(route.dev);
    const spec = [to.text];
    if (route.via !== undefined) {
      const via = canonicalIp(route.via);
      if (via.family !== to.family) throw new DshieldError(ErrorCodes.TUN, `gateway ${via.text} is not IPv${to.family} like ${to.text}`);
      spec.push('via', via.text);
    }
    spec.push('dev', route.dev);
    if (route.metric !== undefined) {
      if (!Number.isInteger(route.metric) || route.metric < 0) throw new DshieldError(ErrorCodes.TUN, `invalid route metric ${route.metric}`);
      spec.push('metric', String(route.metric));
    }
    return this.change({ kind: 'route', family: to.family, spec }, async () => {
      try {
        await runCommand('ip', [to.family === 6 ? '-6' : '-4', 'route', 'add', ...spec]);
      } catch (err) {
        if (isExists(err)) return false;
        throw err;
      }
    });
  }

  /**
   * Send everything through `dev`: 0.0.0.0/1 + 128.0.0.0/1 (more specific
   * than any default route, which stays in place for the tunnel itself), and
   * ::/1 + 8000::/1 when `ipv6`.
   */
  async routeAllThrough(dev: string, opts: { ipv6?: boolean } = {}): Promise<Undo[]> {
    const prefixes = ['0.0.0.0/1', '128.0.0.0/1', ...(opts.ipv6 ? ['::/1', '8000::/1'] : [])];
    const undos: Undo[] = [];
    for (const to of prefixes) undos.push(await this.addRoute({ to, dev }));
    return undos;
  }

  /**
   * Keep the tunnel's own packets on the real interface: a host route
   * (/32 or /128) to the server through whatever carries it now.
   * Call before routeAllThrough. Returns the next hop used.
   */
  async routeToServer(serverIp: string): Promise<{ hop: NextHop; undo: Undo }> {
    const ip = canonicalIp(serverIp);
    const hop = await routeGet(ip.text);
    const undo = await this.addRoute({ to: `${ip.text}/${ip.family === 4 ? 32 : 128}`, dev: hop.dev, via: hop.gateway });
    return { hop, undo };
  }

  /** Split tunnelling, include mode: only these ranges go through `dev`. */
  async routeIncluded(dev: string, cidrs: string[]): Promise<Undo[]> {
    const undos: Undo[] = [];
    for (const c of cidrs) undos.push(await this.addRoute({ to: c, dev }));
    return undos;
  }

  /**
   * Split tunnelling, exclude mode: these ranges keep using the real network
   * (each through the next hop the kernel uses for it now). Call before
   * routeAllThrough; ranges the real network has no route for are skipped.
   */
  async routeExcluded(cidrs: string[]): Promise<Undo[]> {
    const undos: Undo[] = [];
    for (const c of cidrs) {
      const cidr = canonicalCidr(c);
      const network = cidr.text.split('/')[0]!;
      let hop: NextHop;
      try {
        hop = await routeGet(network);
      } catch {
        continue;
      }
      undos.push(await this.addRoute({ to: cidr.text, dev: hop.dev, via: hop.gateway }));
    }
    return undos;
  }

  /**
   * IPv6 leak guard for an IPv4-only tunnel: ::/1 and 8000::/1 unreachable,
   * so IPv6 traffic fails at once instead of leaving outside the tunnel.
   */
  async blockIpv6(): Promise<Undo[]> {
    const undos: Undo[] = [];
    for (const to of ['::/1', '8000::/1']) {
      const spec = ['unreachable', to];
      undos.push(
        await this.change({ kind: 'route', family: 6, spec }, async () => {
          try {
            await runCommand('ip', ['-6', 'route', 'add', ...spec]);
          } catch (err) {
            if (isExists(err)) return false;
            throw err;
          }
        }),
      );
    }
    return undos;
  }

  // -------------------------------------------------------------------------
  // DNS

  /**
   * Point the system resolver at `servers` by replacing resolv.conf (see
   * resolv.ts for how a symlink or a bind mount is handled); the undo puts
   * back the exact previous bytes and symlink, unless something else has
   * rewritten the file since.
   */
  async setDns(servers: string[], opts: { search?: string[]; path?: string } = {}): Promise<Undo> {
    const path = opts.path ?? RESOLV_CONF;
    const content = resolvConfText(servers, opts.search);
    const backup = this.journal?.backupPath('resolv') ?? join(tmpdir(), `dshield-resolv-${process.pid}.bak`);
    const snap = snapshotResolv(path, backup);
    // The hash of what we will write is known before writing: it is recorded first (write-ahead).
    const written = createHash('sha256').update(content).digest('hex');
    const rec: ResolvRecord = { path, previous: snap.previous, backupFile: snap.backupFile, written };
    return this.change({ kind: 'resolv', rec }, async () => {
      writeResolv(path, snap.previous, content);
    });
  }

  // -------------------------------------------------------------------------
  // firewall

  /** The kill switch table (nft.ts): nothing leaves but loopback, the TUN and the server. */
  async killSwitch(opts: KillSwitchOptions): Promise<Undo> {
    const table = checkTableName(opts.table ?? KILL_SWITCH_TABLE);
    const script = killSwitchScript(opts);
    return this.change({ kind: 'nft-table', family: 'inet', name: table }, async () => {
      await runCommand('nft', ['-f', '-'], { input: script });
    });
  }

  /** Server: masquerade the pool, anti-spoof and client-to-client rules (nft.ts). */
  async serverNat(opts: ServerNatOptions): Promise<Undo> {
    const table = checkTableName(opts.table ?? NAT_TABLE);
    const script = serverNatScript(opts);
    return this.change({ kind: 'nft-table', family: 'inet', name: table }, async () => {
      await runCommand('nft', ['-f', '-'], { input: script });
    });
  }

  /**
   * Server: turn on IP forwarding (IPv4, and IPv6 with `ipv6`) in this
   * network namespace; the undo writes back the previous values.
   */
  async enableForwarding(opts: { ipv6?: boolean } = {}): Promise<Undo[]> {
    const paths = ['/proc/sys/net/ipv4/ip_forward', ...(opts.ipv6 ? ['/proc/sys/net/ipv6/conf/all/forwarding'] : [])];
    const undos: Undo[] = [];
    for (const path of paths) {
      const previous = readFileSync(path, 'utf8');
      undos.push(
        await this.change({ kind: 'sysctl', path, previous }, async () => {
          if (previous.trim() === '1') return false;
          try {
            writeFileSync(path, '1\n');
          } catch (err) {
            throw new DshieldError(ErrorCodes.TUN, `cannot turn on IP forwarding (${path}): ${(err as Error).message}`, { cause: err });
          }
        }),
      );
    }
    return undos;
  }
}

export { DEFAULT_STATE_DIR };
