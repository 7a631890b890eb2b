/**
 * Writing into a TUN opened with IFF_VNET_HDR: every write starts with a
 * virtio_net_hdr, and consecutive segments of one TCP flow are written as one
 * GSO packet (receive offload done in user space, as a NIC's GRO would).
 *
 *   packets in order --push--> [pending: one flow's run of segments]
 *       --flush--> write(vnet header + IP packet)
 *
 * Why: each packet written into a TUN crosses the kernel's whole input path
 * on its own (routing, netfilter, the veth to the next host, the receiving
 * socket's TCP). Written as one GSO packet, a run of 40 segments crosses it
 * once; the kernel splits it only where a device needs that (a forwarded
 * packet leaving by a NIC without TSO), and not at all when it is delivered
 * to a local socket or over a veth.
 *
 * A segment joins the run before it when Linux's own GRO would merge them:
 * the same addresses, ports, TTL, TOS, ACK number, window and TCP options;
 * its sequence number right after the run; only ACK (and PSH, which ends the
 * run) set; and no more payload than the run's first segment (less ends it).
 * Anything else is written as it came, after the run is written, so the
 * order of packets is kept. A run waits only for the packets already at
 * hand: its owner flushes at the end of each batch (the pump, before it
 * releases the ring's space), never for a packet yet to come. The merged packet's TCP checksum is left to the
 * kernel (VIRTIO_NET_HDR_F_NEEDS_CSUM): the segments' own checksums are not
 * checked, as they came out of an authenticated record from the peer.
 */
import { u32be } from '../bytes.ts';

/** sizeof(struct virtio_net_hdr): what IFF_VNET_HDR puts before every packet by default. */
export const VNET_HDR_LEN = 10;

const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
const IPPROTO_TCP = 6;
const TCP_ACK = 0x10;
const TCP_PSH = 0x08;
/** The longest IP packet, and so the longest run (IPv4's total length is 16 bits; IPv6's payload length too). */
export const MAX_IP_PACKET = 65535;

export class TcpCoalescer {
  /** The vnet header and the run's packet (or a lone packet) being built. */
  private readonly out = Buffer.alloc(VNET_HDR_LEN + MAX_IP_PACKET);
  /** Bytes of IP packet in out (after the header); 0: nothing pending. */
  private length = 0;
  private segments = 0;
  /** Whether the pending packet may still grow (a TCP segment of the kinds a run takes). */
  private open = false;
  private version = 0;
  private ipHeader = 0;
  private tcpHeader = 0;
  private gsoSize = 0;
  private nextSeq = 0;
  /** Packets merged into the run before them since takeMerged() was last called. */
  private merged = 0;

  /** `write`: one whole write into the TUN (vnet header first), valid only during the call. */
  constructor(private readonly write: (frame: Uint8Array) => void) {}

  /**
   * One IP packet, in the order packets go into the device. It is copied.
   * False (and dropped) when it is longer than any IP packet can be.
   */
  push(p: Uint8Array): boolean {
    if (this.length > 0 && this.open && this.extend(p)) return true;
    this.flush();
    if (p.length > MAX_IP_PACKET) return false;
    this.start(p);
    return true;
  }

  /** How many packets went into the run before them (and not into a write of their own) since the last call. */
  takeMerged(): number {
    const n = this.merged;
    this.merged = 0;
    return n;
  }

  /** Write what is pending. */
  flush(): void {
    if (this.length === 0) return;
    const out = this.out;
    if (this.segments > 1) this.finishRun();
    else out.fill(0, 0, VNET_HDR_LEN);
    this.write(out.subarray(0, VNET_HDR_LEN + this.length));
    this.length = 0;
    this.segments = 0;
    this.open = false;
  }

  private start(p: Uint8Array): void {
    this.out.set(p, VNET_HDR_LEN);
    this.length = p.length;
    this.segments = 1;
    this.open = false;
    const h = tcpSegment(p);
    if (h === 0) return;
    this.version = p[0]! >> 4;
    this.ipHeader = h >>> 8;
    this.tcpHeader = (h & 0xff) << 2;
    const payload = p.length - this.ipHeader - this.tcpHeader;
    const flags = p[this.ipHeader + 13]!;
    this.gsoSize = payload;
    this.nextSeq = (u32be(p, this.ipHeader + 4) + payload) >>> 0;
    this.open = flags === TCP_ACK;
  }

  /** Append `p` to the pending run if it continues it; false if it does not. */
  private extend(p: Uint8Array): boolean {
    const out = this.out;
    const base = VNET_HDR_LEN;
    const ip = this.ipHeader;
    const hdr = ip + this.tcpHeader;
    if (p.length <= hdr || p.length - hdr > this.gsoSize || this.length + p.length - hdr > MAX_IP_PACKET) return false;
    if (p[0]! >> 4 !== this.version || tcpSegment(p) !== ((ip << 8) | (this.tcpHeader >> 2))) return false;
    if (this.version === 4) {
      // Version/IHL, TOS; flags and fragment offset; TTL and protocol; addresses. Not: total length, ID, checksum.
      if (p[0] !== out[base] || p[1] !== out[base + 1] || !same(p, out, 6, base + 6, 4) || !same(p, out, 12, base + 12, 8)) return false;
    } else if (!same(p, out, 0, base, 4) || !same(p, out, 6, base + 6, 34)) {
      // Version, traffic class, flow label; next header, hop limit, addresses. Not: payload length.
      return false;
    }
    // Ports; then the ACK number; data offset, flags and window; urgent pointer and options. Not: sequence number, checksum.
    if (!same(p, out, ip, base + ip, 4) || u32be(p, ip + 4) !== this.nextSeq || !same(p, out, ip + 8, base + ip + 8, 4)) return false;
    const flags = p[ip + 13]!;
    if ((flags & ~TCP_PSH) !== TCP_ACK || p[ip + 12] !== out[base + ip + 12] || !same(p, out, ip + 14, base + ip + 14, 2)) return false;
    if (!same(p, out, ip + 18, base + ip + 18, this.tcpHeader - 18)) return false;
    const payload = p.length - hdr;
    out.set(p.subarray(hdr), base + this.length);
    this.length += payload;
    this.segments++;
    this.merged++;
    this.nextSeq = (this.nextSeq + payload) >>> 0;
    if (flags & TCP_PSH) out[base + ip + 13] |= TCP_PSH;
    // Linux ends a run at a push or a short segment: whatever follows is newer data the reader should see first.
    if (flags & TCP_PSH || payload < this.gsoSize) this.open = false;
    return true;
  }

  /** Lengths, the IPv4 header checksum, the TCP pseudo-header sum for the kernel to finish, and the vnet header. */
  private finishRun(): void {
    const out = this.out;
    const base = VNET_HDR_LEN;
    const ip = this.ipHeader;
    const tcpLength = this.length - ip;
    let sum: number;
    if (this.version === 4) {
      out.writeUInt16BE(this.length, base + 2);
      out.writeUInt16BE(0, base + 10);
      out.writeUInt16BE(~foldSum(sumWords(out, base, ip, 0)) & 0xffff, base + 10);
      sum = sumWords(out, base + 12, 8, IPPROTO_TCP + tcpLength);
    } else {
      out.writeUInt16BE(tcpLength, base + 4);
      sum = sumWords(out, base + 8, 32, IPPROTO_TCP + tcpLength);
    }
    out.writeUInt16BE(foldSum(sum), base + ip + 16);
    out[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    out[1] = this.version === 4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6;
    out.writeUInt16LE(ip + this.tcpHeader, 2); // hdr_len
    out.writeUInt16LE(this.gsoSize, 4); // gso_size
    out.writeUInt16LE(ip, 6); // csum_start
    out.writeUInt16LE(16, 8); // csum_offset: TCP's checksum field
  }
}

/**
 * For a TCP segment with payload that a run may take: (IP header length << 8)
 * | TCP data offset (in 32-bit words); 0 for anything else (not TCP, IPv4
 * options or fragments, IPv6 extension headers, truncated).
 */
function tcpSegment(p: Uint8Array): number {
  const version = p[0]! >> 4;
  let ip: number;
  if (version === 4) {
    if (p.length < 40 || p[0] !== 0x45 || p[9] !== IPPROTO_TCP || (((p[6]! << 8) | p[7]!) & 0x3fff) !== 0) return 0;
    if (((p[2]! << 8) | p[3]!) !== p.length) return 0;
    ip = 20;
  } else if (version === 6) {
    if (p.length < 60 || p[6] !== IPPROTO_TCP || ((p[4]! << 8) | p[5]!) !== p.length - 40) return 0;
    ip = 40;
  } else return 0;
  const words = p[ip + 12]! >> 4;
  if (words < 5 || p.length <= ip + words * 4) return 0;
  return (ip << 8) | words;
}

function same(a: Uint8Array, b: Uint8Array, atA: number, atB: number, n: number): boolean {
  for (let i = 0; i < n; i++) if (a[atA + i] !== b[atB + i]) return false;
  return true;
}

/** `initial` plus the big-endian 16-bit words of `n` (even) bytes at `at`, unfolded. */
function sumWords(p: Uint8Array, at: number, n: number, initial: number): number {
  let sum = initial;
  for (let i = 0; i < n; i += 2) sum += (p[at + i]! << 8) | p[at + i + 1]!;
  return sum;
}

function foldSum(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return sum;
}
