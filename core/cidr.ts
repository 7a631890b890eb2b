/**
 * IP addresses, CIDR ranges and the egress policy.
 *
 * The server's outbound checks every resolved destination address against an
 * EgressPolicy before it connects or sends, so a client cannot use the VPN to
 * reach the server's own loopback, its private network or a cloud metadata
 * service. Checks run per connection and per UDP datagram, so they parse by
 * hand (no regex) and compare 32-bit words.
 */
import { DshieldError, ErrorCodes } from './errors.ts';

/**
 * A parsed IP address. IPv4 is one 32-bit word; IPv6 is four, most
 * significant first. Words are unsigned (0 .. 2^32-1).
 */
export interface IpAddress {
  readonly family: 4 | 6;
  readonly words: readonly number[];
}

/** A CIDR range. `words` holds the network address with host bits cleared. */
export interface Cidr {
  readonly family: 4 | 6;
  readonly words: readonly number[];
  /** 0..32 for IPv4, 0..128 for IPv6. */
  readonly prefix: number;
  /** The range as it was written, for messages. */
  readonly text: string;
}

/**
 * Ranges the server refuses to reach unless the config allows them (DESIGN.md §6).
 * IPv4-mapped IPv6 (::ffff:0:0/96) and NAT64 (64:ff9b::/96) addresses are not
 * listed: EgressPolicy checks them by the IPv4 address they embed.
 */
export const DEFAULT_EGRESS_DENY: readonly string[] = Object.freeze([
  // IPv4
  '0.0.0.0/8', // "this network"; 0.0.0.0 reaches the local host on Linux
  '10.0.0.0/8', // private
  '100.64.0.0/10', // carrier-grade NAT
  '127.0.0.0/8', // loopback
  '169.254.0.0/16', // link-local
  '169.254.169.254/32', // cloud metadata (inside link-local; listed so it is named)
  '172.16.0.0/12', // private
  '192.168.0.0/16', // private
  '224.0.0.0/4', // multicast
  '240.0.0.0/4', // reserved
  '255.255.255.255/32', // limited broadcast (inside 240/4; listed so it is named)
  // IPv6
  '::/128', // unspecified
  '::1/128', // loopback
  '64:ff9b:1::/48', // local-use NAT64 (RFC 8215): the embedded address format is site-specific
  'fc00::/7', // unique local (private)
  'fd00:ec2::254/128', // AWS metadata over IPv6 (inside fc00::/7; listed so it is named)
  'fe80::/10', // link-local
  'fec0::/10', // deprecated site-local, still private where used
  'ff00::/8', // multicast
]);

// ---------------------------------------------------------------------------
// Parsing

const CH_0 = 48;
const CH_9 = 57;
const CH_DOT = 46;
const CH_COLON = 58;

function hexValue(c: number): number {
  if (c >= CH_0 && c <= CH_9) return c - CH_0;
  if (c >= 97 && c <= 102) return c - 87; // a-f
  if (c >= 65 && c <= 70) return c - 55; // A-F
  return -1;
}

/**
 * Parses dotted-quad IPv4 in s[start, end). Returns the address as an unsigned
 * 32-bit number, or -1. Leading zeros are refused: some resolvers read "010"
 * as octal, so accepting it would make the checked and the used address differ.
 */
function parseIpv4Word(s: string, start: number, end: number): number {
  let value = 0;
  let parts = 0;
  let i = start;
  while (parts < 4) {
    const partStart = i;
    let part = 0;
    while (i < end) {
      const c = s.charCodeAt(i);
      if (c < CH_0 || c > CH_9) break;
      part = part * 10 + (c - CH_0);
      i++;
      if (i - partStart > 3) return -1;
    }
    const len = i - partStart;
    if (len === 0 || part > 255 || (len > 1 && s.charCodeAt(partStart) === CH_0)) return -1;
    value = value * 256 + part;
    parts++;
    if (parts < 4) {
      if (i >= end || s.charCodeAt(i) !== CH_DOT) return -1;
      i++;
    }
  }
  return i === end ? value : -1;
}

/** Parses IPv6 text in s[start, end) into four words, or returns null. */
function parseIpv6Words(s: string, start: number, end: number): number[] | null {
  const groups: number[] = [];
  let gapAt = -1; // index in `groups` where "::" stands
  let i = start;
  if (end - start < 2) return null;
  if (s.charCodeAt(i) === CH_COLON) {
    if (s.charCodeAt(i + 1) !== CH_COLON) return null;
    gapAt = 0;
    i += 2;
  }
  while (i < end) {
    if (groups.length >= 8) return null;
    const groupStart = i;
    let value = 0;
    while (i < end) {
      const h = hexValue(s.charCodeAt(i));
      if (h < 0) break;
      value = value * 16 + h;
      i++;
    }
    const len = i - groupStart;
    if (i < end && s.charCodeAt(i) === CH_DOT) {
      // Dotted IPv4 in the last 32 bits (::ffff:1.2.3.4).
      if (len === 0 || groups.length > 6) return null;
      const v4 = parseIpv4Word(s, groupStart, end);
      if (v4 < 0) return null;
      groups.push(v4 >>> 16, v4 & 0xffff);
      i = end;
      break;
    }
    if (len === 0 || len > 4) return null;
    groups.push(value);
    if (i === end) break;
    if (s.charCodeAt(i) !== CH_COLON) return null;
    i++;
    if (i < end && s.charCodeAt(i) === CH_COLON) {
      if (gapAt >= 0) return null; // a second "::"
      gapAt = groups.length;
      i++;
    } else if (i === end) {
      return null; // a trailing single colon
    }
  }
  let full: number[];
  if (gapAt >= 0) {
    if (groups.length > 7) return null;
    full = groups.slice(0, gapAt);
    for (let k = groups.length; k < 8; k++) full.push(0);
    full.push(...groups.slice(gapAt));
  } else {
    if (groups.length !== 8) return null;
    full = groups;
  }
  return [
    (full[0]! * 0x10000 + full[1]!) >>> 0,
    (full[2]! * 0x10000 + full[3]!) >>> 0,
    (full[4]! * 0x10000 + full[5]!) >>> 0,
    (full[6]! * 0x10000 + full[7]!) >>> 0,
  ];
}

/**
 * Parses an IPv4 or IPv6 address (IPv6 may be in brackets and may carry a
 * "%zone", which is ignored). Returns null for anything else, including
 * domain names and IPv4 with leading zeros.
 */
export function parseIp(text: string): IpAddress | null {
  let start = 0;
  let end = text.length;
  if (end === 0 || end > 64) return null;
  if (text.charCodeAt(0) === 91 /* [ */) {
    if (text.charCodeAt(end - 1) !== 93 /* ] */) return null;
    start = 1;
    end -= 1;
  }
  const zone = text.indexOf('%', start);
  if (zone >= 0 && zone < end) end = zone;
  if (text.indexOf(':', start) >= 0) {
    const words = parseIpv6Words(text, start, end);
    return words ? { family: 6, words } : null;
  }
  if (start !== 0) return null; // brackets around IPv4
  const v4 = parseIpv4Word(text, start, end);
  return v4 < 0 ? null : { family: 4, words: [v4] };
}

/** True when `text` is an IPv4 or IPv6 address literal (not a domain name). */
export function isIp(text: string): boolean {
  return parseIp(text) !== null;
}

/** The address as 4 or 16 network-order bytes (for wire formats such as SOCKS5). */
export function ipToBytes(ip: IpAddress): Buffer {
  const out = Buffer.allocUnsafe(ip.words.length * 4);
  for (let k = 0; k < ip.words.length; k++) out.writeUInt32BE(ip.words[k]!, k * 4);
  return out;
}

/** Reads 4 (IPv4) or 16 (IPv6) network-order bytes. */
export function ipFromBytes(bytes: Uint8Array): IpAddress {
  const view = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.length === 4) return { family: 4, words: [view.readUInt32BE(0)] };
  if (view.length === 16) {
    return { family: 6, words: [view.readUInt32BE(0), view.readUInt32BE(4), view.readUInt32BE(8), view.readUInt32BE(12)] };
  }
  throw new RangeError(`an IP address is 4 or 16 bytes, not ${view.length}`);
}

/** Canonical text: dotted quad, or RFC 5952 IPv6 (lowercase, longest zero run as "::", mapped IPv4 dotted). */
export function formatIp(ip: IpAddress): string {
  if (ip.family === 4) {
    const w = ip.words[0]!;
    return `${w >>> 24}.${(w >>> 16) & 255}.${(w >>> 8) & 255}.${w & 255}`;
  }
  const [w0, w1, w2, w3] = ip.words as [number, number, number, number];
  // RFC 5952 §5: IPv4-mapped addresses keep the dotted quad.
  if (w0 === 0 && w1 === 0 && w2 === 0xffff) return `::ffff:${formatIp({ family: 4, words: [w3] })}`;
  const groups: number[] = [];
  for (const w of ip.words) groups.push(w >>> 16, w & 0xffff);
  let bestAt = -1;
  let bestLen = 1; // a single zero group is not compressed
  for (let k = 0; k < 8; ) {
    if (groups[k] !== 0) {
      k++;
      continue;
    }
    let j = k;
    while (j < 8 && groups[j] === 0) j++;
    if (j - k > bestLen) {
      bestAt = k;
      bestLen = j - k;
    }
    k = j;
  }
  const hex = (from: number, to: number) => groups.slice(from, to).map((g) => g.toString(16)).join(':');
  if (bestAt < 0) return hex(0, 8);
  return `${hex(0, bestAt)}::${hex(bestAt + bestLen, 8)}`;
}

/**
 * The IPv4 address embedded in an IPv4-mapped (::ffff:a.b.c.d) or NAT64
 * well-known-prefix (64:ff9b::a.b.c.d) IPv6 address, or null. Both reach an
 * IPv4 host, so the policy must judge them as that host.
 */
export function embeddedIpv4(ip: IpAddress): IpAddress | null {
  if (ip.family !== 6) return null;
  const [w0, w1, w2, w3] = ip.words as [number, number, number, number];
  if (w0 === 0 && w1 === 0 && w2 === 0x0000ffff) return { family: 4, words: [w3] };
  if (w0 === 0x0064ff9b && w1 === 0 && w2 === 0) return { family: 4, words: [w3] };
  return null;
}

/** A 32-bit mask with the top `bits` bits set (bits clamped to 0..32). */
function wordMask(bits: number): number {
  if (bits <= 0) return 0;
  if (bits >= 32) return 0xffffffff;
  return (0xffffffff << (32 - bits)) >>> 0;
}

/**
 * Parses "10.0.0.0/8", "fd00::/8", or a bare address (= /32 or /128). Host
 * bits below the prefix are cleared ("10.1.2.3/8" is 10.0.0.0/8).
 * Throws DshieldError(CONFIG) with the reason for anything else.
 */
export function parseCidr(text: string): Cidr {
  const fail = (why: string): never => {
    throw new DshieldError(
      ErrorCodes.CONFIG,
      `invalid address range "${text}": ${why} (expected e.g. "10.0.0.0/8", "fd00::/8" or a single address)`,
    );
  };
  if (typeof text !== 'string') fail('not a string');
  const s = text.trim();
  const slash = s.indexOf('/');
  const addressPart = slash < 0 ? s : s.slice(0, slash);
  const ip = parseIp(addressPart);
  if (!ip) fail(`"${addressPart}" is not an IPv4 or IPv6 address`);
  const maxPrefix = ip!.family === 4 ? 32 : 128;
  let prefix = maxPrefix;
  if (slash >= 0) {
    const p = s.slice(slash + 1);
    if (p.length === 0 || p.length > 3) fail('the prefix length must be a number');
    prefix = 0;
    for (let k = 0; k < p.length; k++) {
      const c = p.charCodeAt(k);
      if (c < CH_0 || c > CH_9) fail('the prefix length must be a number');
      prefix = prefix * 10 + (c - CH_0);
    }
    if (prefix > maxPrefix) fail(`the prefix length must be 0..${maxPrefix} for IPv${ip!.family}`);
  }
  const words = ip!.words.map((w, k) => (w & wordMask(prefix - k * 32)) >>> 0);
  return { family: ip!.family, words, prefix, text };
}

/** True when `ip` lies inside `cidr`. */
export function cidrContainsIp(cidr: Cidr, ip: IpAddress): boolean {
  if (cidr.family !== ip.family) return false;
  for (let k = 0; k < cidr.words.length; k++) {
    const bits = cidr.prefix - k * 32;
    if (bits <= 0) return true;
    if (((ip.words[k]! & wordMask(bits)) >>> 0) !== cidr.words[k]) return false;
  }
  return true;
}

/**
 * True when the address `ip` (text) lies inside `cidr`. Strict about
 * families: "::ffff:127.0.0.1" is not inside 127.0.0.0/8 here (EgressPolicy
 * unwraps mapped addresses; this function does not). False for non-addresses.
 */
export function cidrContains(cidr: Cidr, ip: string): boolean {
  const parsed = parseIp(ip);
  return parsed !== null && cidrContainsIp(cidr, parsed);
}

// ---------------------------------------------------------------------------
// Egress policy

/**
 * Decides which destination addresses the server may reach: everything except
 * DEFAULT_EGRESS_DENY, where a range in `allow` exempts the addresses it
 * covers. (So allowing 169.254.0.0/16 also allows the metadata address in it.)
 * IPv4-mapped and NAT64 IPv6 addresses are judged by their embedded IPv4
 * address, against the IPv4 deny and allow ranges.
 */
export class EgressPolicy {
  private readonly deny: { 4: Cidr[]; 6: Cidr[] } = { 4: [], 6: [] };
  private readonly allow: { 4: Cidr[]; 6: Cidr[] } = { 4: [], 6: [] };

  /** Throws DshieldError(CONFIG) naming the bad entry when an allow range is malformed. */
  constructor(allow: readonly string[] = [], deny: readonly string[] = DEFAULT_EGRESS_DENY) {
    for (const text of deny) {
      const c = parseCidr(text);
      this.deny[c.family].push(c);
    }
    for (const text of allow) {
      let c: Cidr;
      try {
        c = parseCidr(text);
      } catch (err) {
        throw new DshieldError(ErrorCodes.CONFIG, `egress allow list: ${(err as Error).message}`, { cause: err });
      }
      this.allow[c.family].push(c);
    }
  }

  /** True when the destination address may be reached. False for anything that is not an IP address. */
  check(ip: string): boolean {
    const parsed = parseIp(ip);
    return parsed !== null && this.checkIp(parsed);
  }

  /** Same as check, for an already parsed address. */
  checkIp(ip: IpAddress): boolean {
    const target = embeddedIpv4(ip) ?? ip;
    const family = target.family;
    if (!matchesAny(this.deny[family], target)) return true;
    return matchesAny(this.allow[family], target);
  }
}

function matchesAny(list: Cidr[], ip: IpAddress): boolean {
  for (let k = 0; k < list.length; k++) if (cidrContainsIp(list[k]!, ip)) return true;
  return false;
}
