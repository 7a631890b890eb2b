/**
 * The nftables rulesets TUN mode installs, as scripts for `nft -f -`.
 *
 * Each ruleset is one table of our own, replaced atomically: the script
 * declares the table, deletes it and declares it again with its chains, all
 * in one nft transaction, so applying twice leaves one copy and there is no
 * moment without rules. Removing is `nft delete table FAMILY NAME`; nothing
 * outside our tables is ever touched.
 *
 * Every value that goes into a script is validated or canonicalised first
 * (addresses through parseCidr, names against a strict pattern), so a config
 * value can never inject nft syntax.
 */
import { DshieldError, ErrorCodes } from '../errors.ts';
import { cidrContainsIp, formatIp, parseCidr, parseIp, type Cidr } from '../cidr.ts';

export const KILL_SWITCH_TABLE = 'dshield_killswitch';
export const NAT_TABLE = 'dshield_nat';

const IFNAME_RE = /^[A-Za-z0-9_.-]{1,15}$/;
const TABLE_RE = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;

export function checkIfName(name: string): string {
  if (!IFNAME_RE.test(name)) throw new DshieldError(ErrorCodes.TUN, `invalid interface name "${name}"`);
  return name;
}

export function checkTableName(name: string): string {
  if (!TABLE_RE.test(name)) throw new DshieldError(ErrorCodes.TUN, `invalid nftables table name "${name}"`);
  return name;
}

/** Canonical "a.b.c.d/n" or "x::/n", with its family. */
export function canonicalCidr(text: string): { text: string; family: 4 | 6 } {
  let c;
  try {
    c = parseCidr(text);
  } catch (err) {
    throw new DshieldError(ErrorCodes.TUN, (err as Error).message, { cause: err });
  }
  return { text: `${formatIp({ family: c.family, words: c.words })}/${c.prefix}`, family: c.family };
}

/** Canonical address text, with its family. */
export function canonicalIp(text: string): { text: string; family: 4 | 6 } {
  const ip = parseIp(text);
  if (!ip) throw new DshieldError(ErrorCodes.TUN, `"${text}" is not an IP address`);
  return { text: formatIp(ip), family: ip.family };
}

function replaceTable(family: string, name: string, body: string[]): string {
  return [`table ${family} ${name}`, `delete table ${family} ${name}`, `table ${family} ${name} {`, ...body, '}', ''].join('\n');
}

export interface KillSwitchOptions {
  /** The TUN interface: everything through it is allowed. */
  tunDev: string;
  /** The VPN server endpoints the tunnel itself uses (resolved addresses). */
  servers: Array<{ ip: string; port: number; protocols?: Array<'udp' | 'tcp'> }>;
  /** Extra destinations allowed outside the tunnel (e.g. the LAN: "192.168.1.0/24"). */
  allow?: string[];
  /** Allow DHCP (udp 67/68) so the real interface keeps its lease. Default true. */
  allowDhcp?: boolean;
  table?: string;
}

/**
 * Output and forward chains with policy drop: only loopback, the TUN
 * interface, the server endpoints (and `allow`) get out. Matching the TUN by
 * name keeps working while the device is re-created during a reconnect.
 */
export function killSwitchScript(opts: KillSwitchOptions): string {
  const table = checkTableName(opts.table ?? KILL_SWITCH_TABLE);
  const tun = checkIfName(opts.tunDev);
  const out: string[] = ['oifname "lo" accept', `oifname "${tun}" accept`];
  for (const s of opts.servers) {
    const ip = canonicalIp(s.ip);
    if (!Number.isInteger(s.port) || s.port < 1 || s.port > 65535) {
      throw new DshieldError(ErrorCodes.TUN, `invalid server port ${s.port}`);
    }
    const fam = ip.family === 4 ? 'ip' : 'ip6';
    for (const proto of s.protocols ?? ['udp', 'tcp']) {
      if (proto !== 'udp' && proto !== 'tcp') throw new DshieldError(ErrorCodes.TUN, `invalid protocol ${String(proto)}`);
      out.push(`${fam} daddr ${ip.text} ${proto} dport ${s.port} accept`);
    }
  }
  for (const a of opts.allow ?? []) {
    const c = canonicalCidr(a);
    out.push(`${c.family === 4 ? 'ip' : 'ip6'} daddr ${c.text} accept`);
  }
  if (opts.allowDhcp ?? true) {
    out.push('udp sport 68 udp dport 67 accept', 'udp sport 546 udp dport 547 accept');
  }
  // IPv6 neighbour discovery on the real link: without it the kernel cannot
  // even resolve the next hop for the server (when the server is IPv6).
  out.push('icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept');
  return replaceTable('inet', table, [
    '  chain output {',
    '    type filter hook output priority filter; policy drop;',
    ...out.map((r) => `    ${r}`),
    '  }',
    '  chain forward {',
    '    type filter hook forward priority filter; policy drop;',
    `    oifname "${tun}" accept`,
    `    iifname "${tun}" accept`,
    '  }',
  ]);
}

export interface ServerNatOptions {
  /** The server's TUN interface. */
  tunDev: string;
  /** The client address pool, e.g. "10.66.0.0/24". */
  subnet: string;
  /** The IPv6 pool, if any. Without it, IPv6 from the TUN is dropped. */
  subnet6?: string;
  /** Masquerade out of this interface only; default: any interface but the TUN. */
  egressDev?: string;
  /** Let clients reach each other through the server. Default false. */
  clientToClient?: boolean;
  /** Masquerade (NAT) at all. Default true. */
  nat?: boolean;
  /**
   * The egress policy for clients' packets (forwarded, or to this host):
   * destinations in `deny` are dropped unless inside a range of `allow`
   * (core/cidr.ts DEFAULT_EGRESS_DENY and server.egress.allow). Default: no policy.
   */
  egress?: { deny: readonly string[]; allow: readonly string[] };
  /** Resolvers the clients were told to use: DNS to them is allowed whatever the egress policy says. */
  dns?: readonly string[];
  table?: string;
}

/** Canonical ranges without those another one in the list already covers (nft refuses overlapping set elements). */
function outermost(list: readonly string[]): { text: string; family: 4 | 6 }[] {
  const parsed: Cidr[] = list.map((t) => canonicalCidr(t)).map((c) => parseCidr(c.text));
  const keep = parsed.filter(
    (c, i) => !parsed.some((o, j) => j !== i && o.family === c.family && o.prefix <= c.prefix && cidrContainsIp(o, c) && (o.prefix < c.prefix || j < i)),
  );
  return keep.map((c) => ({ text: `${formatIp({ family: c.family, words: c.words })}/${c.prefix}`, family: c.family }));
}

/** `ip daddr { a, b }` / `ip6 daddr { ... }` rules for a list of ranges, one per family present. */
function daddrRules(prefix: string, list: readonly string[], verdict: string): string[] {
  const ranges = outermost(list);
  const out: string[] = [];
  for (const fam of [4, 6] as const) {
    const mine = ranges.filter((r) => r.family === fam).map((r) => r.text);
    if (mine.length > 0) out.push(`${prefix} ${fam === 4 ? 'ip' : 'ip6'} daddr { ${mine.join(', ')} } ${verdict}`);
  }
  return out;
}

/**
 * Masquerade the pool behind the server's address, drop packets from the TUN
 * whose source is outside the pool (a coarse anti-spoof: the server also
 * checks each client's exact address in userspace), and drop client-to-client
 * unless allowed.
 */
export function serverNatScript(opts: ServerNatOptions): string {
  const table = checkTableName(opts.table ?? NAT_TABLE);
  const tun = checkIfName(opts.tunDev);
  const v4 = canonicalCidr(opts.subnet);
  if (v4.family !== 4) throw new DshieldError(ErrorCodes.TUN, `the TUN subnet must be IPv4, got ${opts.subnet}`);
  const v6 = opts.subnet6 !== undefined ? canonicalCidr(opts.subnet6) : undefined;
  if (v6 && v6.family !== 6) throw new DshieldError(ErrorCodes.TUN, `the TUN subnet6 must be IPv6, got ${opts.subnet6}`);
  const out = opts.egressDev !== undefined ? `oifname "${checkIfName(opts.egressDev)}"` : `oifname != "${tun}"`;
  const body: string[] = [];
  if (opts.nat ?? true) {
    body.push(
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    ip saddr ${v4.text} ${out} masquerade`,
      ...(v6 ? [`    ip6 saddr ${v6.text} ${out} masquerade`] : []),
      '  }',
    );
  }
  const antiSpoof = [
    `    iifname "${tun}" ip saddr != ${v4.text} drop`,
    v6 ? `    iifname "${tun}" ip6 saddr != ${v6.text} drop` : `    iifname "${tun}" meta nfproto ipv6 drop`,
  ];
  // The egress policy, after the exceptions: DNS to the named resolvers, then the allowed ranges.
  const policy: string[] = [];
  if (opts.egress) {
    const dns = (opts.dns ?? []).map((d) => canonicalIp(d));
    for (const fam of [4, 6] as const) {
      const mine = dns.filter((d) => d.family === fam).map((d) => d.text);
      if (mine.length === 0) continue;
      const match = `iifname "${tun}" ${fam === 4 ? 'ip' : 'ip6'} daddr { ${[...new Set(mine)].join(', ')} }`;
      policy.push(`    ${match} udp dport 53 accept`, `    ${match} tcp dport 53 accept`);
    }
    policy.push(...daddrRules(`    iifname "${tun}"`, opts.egress.allow, 'accept'));
    policy.push(...daddrRules(`    iifname "${tun}"`, opts.egress.deny, 'drop'));
  }
  body.push(
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    ...antiSpoof,
    `    iifname "${tun}" oifname "${tun}" ${opts.clientToClient ? 'accept' : 'drop'}`,
    ...policy,
    '  }',
  );
  if (opts.egress) {
    // Packets from clients to this host's own addresses: the same policy (so the
    // pool's private range, the host's LAN and loopback services stay closed),
    // but a ping to the gateway answers.
    body.push(
      '  chain input {',
      '    type filter hook input priority filter; policy accept;',
      ...antiSpoof,
      `    iifname "${tun}" icmp type echo-request accept`,
      `    iifname "${tun}" icmpv6 type { echo-request, nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept`,
      ...policy,
      '  }',
    );
  }
  return replaceTable('inet', table, body);
}
