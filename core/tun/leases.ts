/**
 * The server's TUN address pool: each client name gets one host number in
 * server.tun.subnet (and the same host number in subnet6), the same one every
 * time, remembered in a JSON file across restarts.
 *
 * Host number 1 is the server's own address; clients get 2 .. broadcast-1,
 * the lowest free first. A lease is never given to another name while its
 * owner may come back, except when the pool is full: then a lease whose
 * owner the caller says is gone (no longer an authorized client, not
 * connected) is taken over. Nothing free and nothing to take over: the pool
 * is full, DshieldError(TUN), and the server refuses that handshake.
 *
 * The file ({ version: 1, subnet, leases: { name: "10.66.0.2" } }) is
 * written atomically (a temporary file, fsync, rename) with mode 0600, so a
 * crash leaves the old file or the new one, never half of one.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { dirname } from 'node:path';
import { formatIp, parseCidr, parseIp, type Cidr } from '../cidr.ts';
import { DshieldError, ErrorCodes } from '../errors.ts';

export interface Lease {
  /** The client's name (server.clients). */
  name: string;
  /** Host number in the pool (2 ..). */
  host: number;
  /** "10.66.0.2/24": the address with the pool's prefix, as the client assigns it. */
  address: string;
  /** "10.66.0.2". */
  ip: string;
  /** "fd66::2/64" when the pool has IPv6. */
  address6?: string;
  ip6?: string;
}

export interface LeasePoolOptions {
  /** IPv4 pool, e.g. "10.66.0.0/24" (/8 .. /30). */
  subnet: string;
  /** IPv6 pool, e.g. "fd66::/64", with at least as many host bits as subnet. */
  subnet6?: string;
  /** The leases file; created on the first lease. */
  file: string;
}

interface LeasesFile {
  version: 1;
  subnet: string;
  leases: Record<string, string>;
}

export class LeasePool {
  private readonly v4: Cidr;
  private readonly v6: Cidr | undefined;
  private readonly file: string;
  /** name -> host number. */
  private readonly byName = new Map<string, number>();
  /** host number -> name. */
  private readonly byHost = new Map<number, string>();
  /** The highest client host number (broadcast - 1). */
  readonly lastHost: number;
  /** Host bits of the IPv4 pool, as a mask of the low word. */
  private readonly hostMask: number;

  /**
   * Reads the leases file (a missing one is an empty pool). Leases outside
   * the configured subnet (it changed) are forgotten. Throws
   * DshieldError(TUN) naming the file when it is unreadable or malformed.
   */
  constructor(opts: LeasePoolOptions) {
    this.v4 = parseCidr(opts.subnet);
    if (this.v4.family !== 4 || this.v4.prefix < 8 || this.v4.prefix > 30) {
      throw new DshieldError(ErrorCodes.TUN, `the TUN subnet must be an IPv4 range from /8 to /30, got ${opts.subnet}`);
    }
    this.v6 = opts.subnet6 ? parseCidr(opts.subnet6) : undefined;
    if (this.v6 && (this.v6.family !== 6 || 128 - this.v6.prefix < 32 - this.v4.prefix)) {
      throw new DshieldError(ErrorCodes.TUN, `the TUN subnet6 must be an IPv6 range at least as large as subnet, got ${opts.subnet6}`);
    }
    this.file = opts.file;
    const size = 2 ** (32 - this.v4.prefix);
    this.lastHost = size - 2;
    this.hostMask = size - 1;
    this.load();
  }

  /** The server's own address with the pool's prefix ("10.66.0.1/24"). */
  get serverAddress(): string {
    return `${this.ipOf(1)}/${this.v4.prefix}`;
  }

  /** The server's own IPv6 address with prefix, when the pool has IPv6. */
  get serverAddress6(): string | undefined {
    return this.v6 ? `${this.ip6Of(1)}/${this.v6.prefix}` : undefined;
  }

  /** How many leases are recorded. */
  get size(): number {
    return this.byName.size;
  }

  /**
   * The lease of `name`: its recorded one, or a new one (saved before this
   * returns). `isGone(other)` may say that another name's lease can be taken
   * over when the pool is full. Throws DshieldError(TUN) when the pool is full.
   */
  lease(name: string, isGone?: (other: string) => boolean): Lease {
    let host = this.byName.get(name);
    if (host === undefined) {
      host = this.freeHost() ?? this.takeOver(isGone);
      if (host === undefined) {
        throw new DshieldError(
          ErrorCodes.TUN,
          `the TUN address pool ${this.v4.text} is full (${this.lastHost - 1} clients): no address for "${name}"; use a larger server.tun.subnet`,
        );
      }
      this.byName.set(name, host);
      this.byHost.set(host, name);
      this.save();
    }
    return this.leaseOf(name, host);
  }

  /** The recorded lease of `name`, if any (no new lease is made). */
  find(name: string): Lease | undefined {
    const host = this.byName.get(name);
    return host === undefined ? undefined : this.leaseOf(name, host);
  }

  /**
   * The pool host number of an IPv4 address (as a 32-bit word), or -1 when it
   * is outside the pool. For the data path: no parsing, no allocation.
   */
  hostOf4(word: number): number {
    return ((word & ~this.hostMask) >>> 0) === this.v4.words[0] ? word & this.hostMask : -1;
  }

  /**
   * The pool host number of an IPv6 address (16 bytes at `at` in `buf`), or -1
   * when it is outside the pool or has host bits beyond the IPv4 pool's.
   */
  hostOf6(buf: Buffer, at: number): number {
    const v6 = this.v6;
    if (!v6) return -1;
    // Every bit above the IPv4 host bits must match the IPv6 network (its host bits there are 0).
    for (let k = 0; k < 3; k++) if (buf.readUInt32BE(at + 4 * k) !== v6.words[k]) return -1;
    const last = buf.readUInt32BE(at + 12);
    return ((last & ~this.hostMask) >>> 0) === v6.words[3] ? last & this.hostMask : -1;
  }

  private leaseOf(name: string, host: number): Lease {
    const ip = this.ipOf(host);
    const lease: Lease = { name, host, ip, address: `${ip}/${this.v4.prefix}` };
    if (this.v6) {
      lease.ip6 = this.ip6Of(host);
      lease.address6 = `${lease.ip6}/${this.v6.prefix}`;
    }
    return lease;
  }

  private ipOf(host: number): string {
    return formatIp({ family: 4, words: [(this.v4.words[0]! | host) >>> 0] });
  }

  private ip6Of(host: number): string {
    const w = this.v6!.words;
    return formatIp({ family: 6, words: [w[0]!, w[1]!, w[2]!, (w[3]! | host) >>> 0] });
  }

  private freeHost(): number | undefined {
    for (let host = 2; host <= this.lastHost; host++) if (!this.byHost.has(host)) return host;
    return undefined;
  }

  private takeOver(isGone?: (other: string) => boolean): number | undefined {
    if (!isGone) return undefined;
    for (const [name, host] of this.byName) {
      if (isGone(name)) {
        this.byName.delete(name);
        this.byHost.delete(host);
        return host;
      }
    }
    return undefined;
  }

  private load(): void {
    let text: string;
    try {
      text = readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw new DshieldError(ErrorCodes.TUN, `server.tun.leasesFile: cannot read ${this.file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
    }
    let parsed: unknown;
    try {
      parsed = text.trim() === '' ? { leases: {} } : JSON.parse(text);
    } catch (err) {
      throw new DshieldError(ErrorCodes.TUN, `server.tun.leasesFile: ${this.file} is not valid JSON (${(err as Error).message}); fix or delete it`);
    }
    const leases = (parsed as Partial<LeasesFile> | null)?.leases;
    if (typeof leases !== 'object' || leases === null || Array.isArray(leases)) {
      throw new DshieldError(ErrorCodes.TUN, `server.tun.leasesFile: ${this.file} has no "leases" object; fix or delete it`);
    }
    for (const [name, value] of Object.entries(leases)) {
      const ip = typeof value === 'string' ? parseIp(value) : null;
      if (!ip || ip.family !== 4) continue;
      const host = this.hostOf4(ip.words[0]!);
      // Outside today's pool (the subnet changed), the server's own, or taken twice: forget it.
      if (host < 2 || host > this.lastHost || this.byHost.has(host)) continue;
      this.byName.set(name, host);
      this.byHost.set(host, name);
    }
  }

  private save(): void {
    const data: LeasesFile = { version: 1, subnet: this.v4.text, leases: {} };
    for (const [name, host] of [...this.byName].sort((a, b) => a[1] - b[1])) data.leases[name] = this.ipOf(host);
    const tmp = `${this.file}.${process.pid}.tmp`;
    try {
      mkdirSync(dirname(this.file), { recursive: true, mode: 0o700 });
      const fd = openSync(tmp, 'w', 0o600);
      try {
        writeSync(fd, `${JSON.stringify(data, null, 2)}\n`);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      renameSync(tmp, this.file);
    } catch (err) {
      rmSync(tmp, { force: true });
      throw new DshieldError(ErrorCodes.TUN, `server.tun.leasesFile: cannot write ${this.file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
    }
  }
}
