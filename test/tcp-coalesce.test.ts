/**
 * core/tun/tcp-coalesce.ts: which packets join a run, and what the one write
 * of a run says to the kernel. The kernel's side is simulated where it
 * matters: it finishes a merged packet's TCP checksum from the pseudo-header
 * sum the coalescer leaves (VIRTIO_NET_HDR_F_NEEDS_CSUM), and the result
 * must check as a normal packet's would. test/tun-device.test.ts writes runs
 * into a real device.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { MAX_IP_PACKET, TcpCoalescer, VNET_HDR_LEN } from '../core/tun/tcp-coalesce.ts';

const ACK = 0x10;
const PSH = 0x08;
const SYN = 0x02;
const FIN = 0x01;

interface Segment {
  seq: number;
  payload: number | Buffer;
  flags?: number;
  ack?: number;
  window?: number;
  sport?: number;
  options?: Buffer;
  ttl?: number;
  v6?: boolean;
}

const SRC4 = [10, 0, 0, 2];
const DST4 = [10, 0, 0, 1];
const SRC6 = Buffer.from('fd000000000000000000000000000002', 'hex');
const DST6 = Buffer.from('fd000000000000000000000000000001', 'hex');
/** A TCP timestamps option, as Linux sends on every segment (NOP, NOP, TS). */
const TIMESTAMPS = Buffer.from([1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);

/** A TCP segment with correct checksums; payload bytes are `seq + i` (mod 256) unless given. */
function segment(s: Segment): Buffer {
  const options = s.options ?? Buffer.alloc(0);
  const payload = typeof s.payload === 'number' ? Buffer.from(Array.from({ length: s.payload }, (_, i) => (s.seq + i) & 0xff)) : s.payload;
  const ip = s.v6 ? 40 : 20;
  const tcpLength = 20 + options.length + payload.length;
  const p = Buffer.alloc(ip + tcpLength);
  if (s.v6) {
    p[0] = 0x60;
    p.writeUInt16BE(tcpLength, 4);
    p[6] = 6;
    p[7] = s.ttl ?? 64;
    SRC6.copy(p, 8);
    DST6.copy(p, 24);
  } else {
    p[0] = 0x45;
    p.writeUInt16BE(p.length, 2);
    p.writeUInt16BE(s.seq & 0xffff, 4); // an ID that changes per packet, as Linux's do
    p[6] = 0x40; // DF
    p[8] = s.ttl ?? 64;
    p[9] = 6;
    p.set(SRC4, 12);
    p.set(DST4, 16);
    p.writeUInt16BE(~sum(p, 0, 20, 0) & 0xffff, 10);
  }
  p.writeUInt16BE(s.sport ?? 40000, ip);
  p.writeUInt16BE(5201, ip + 2);
  p.writeUInt32BE(s.seq >>> 0, ip + 4);
  p.writeUInt32BE(s.ack ?? 7777, ip + 8);
  p[ip + 12] = ((20 + options.length) / 4) << 4;
  p[ip + 13] = s.flags ?? ACK;
  p.writeUInt16BE(s.window ?? 502, ip + 14);
  options.copy(p, ip + 20);
  payload.copy(p, ip + 20 + options.length);
  p.writeUInt16BE(~sum(p, ip, tcpLength, pseudo(p, s.v6 ?? false, tcpLength)) & 0xffff, ip + 16);
  return p;
}

function pseudo(p: Buffer, v6: boolean, tcpLength: number): number {
  return v6 ? sum(p, 8, 32, 6 + tcpLength) : sum(p, 12, 8, 6 + tcpLength);
}

/** Folded ones'-complement sum of the 16-bit words at `at` (an odd length ends with a padded byte). */
function sum(p: Uint8Array, at: number, n: number, initial: number): number {
  let s = initial;
  for (let i = 0; i < n; i += 2) s += (p[at + i]! << 8) | (i + 1 < n ? p[at + i + 1]! : 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return s;
}

/** A coalescer whose writes are kept (copied). */
function coalescer(): { c: TcpCoalescer; frames: Buffer[] } {
  const frames: Buffer[] = [];
  return { c: new TcpCoalescer((f) => frames.push(Buffer.from(f))), frames };
}

function header(frame: Buffer) {
  return {
    flags: frame[0],
    gsoType: frame[1],
    hdrLen: frame.readUInt16LE(2),
    gsoSize: frame.readUInt16LE(4),
    csumStart: frame.readUInt16LE(6),
    csumOffset: frame.readUInt16LE(8),
  };
}

/** What the kernel makes of a frame that asks it to finish the checksum: the packet with its TCP checksum filled in. */
function finishedByKernel(frame: Buffer): Buffer {
  const h = header(frame);
  const p = Buffer.from(frame.subarray(VNET_HDR_LEN));
  if (h.flags === 1) {
    const at = h.csumStart + h.csumOffset;
    const partial = sum(p, h.csumStart, p.length - h.csumStart, 0);
    p.writeUInt16BE(~partial & 0xffff, at);
  }
  return p;
}

function tcpChecksumValid(p: Buffer): boolean {
  const v6 = p[0]! >> 4 === 6;
  const ip = v6 ? 40 : 20;
  return sum(p, ip, p.length - ip, pseudo(p, v6, p.length - ip)) === 0xffff;
}

test('a run of one flow is one write: a GSO packet whose checksums the kernel can finish', () => {
  for (const options of [undefined, TIMESTAMPS]) {
    const { c, frames } = coalescer();
    const segs = [0, 1, 2, 3, 4].map((i) => segment({ seq: 1000 + i * 1200, payload: 1200, options, flags: i === 4 ? ACK | PSH : ACK }));
    for (const s of segs) assert.ok(c.push(s));
    assert.is(frames.length, 0, 'nothing is written before the run ends');
    c.flush();
    assert.is(frames.length, 1);
    assert.is(c.takeMerged(), 4);
    assert.is(c.takeMerged(), 0, 'taken');
    const tcpHeader = 20 + (options?.length ?? 0);
    assert.equal(header(frames[0]!), { flags: 1, gsoType: 1, hdrLen: 20 + tcpHeader, gsoSize: 1200, csumStart: 20, csumOffset: 16 });
    const p = finishedByKernel(frames[0]!);
    assert.is(p.length, 20 + tcpHeader + 6000);
    assert.is(p.readUInt16BE(2), p.length, 'IPv4 total length');
    assert.is(sum(p, 0, 20, 0), 0xffff, 'IPv4 header checksum');
    assert.ok(tcpChecksumValid(p), 'TCP checksum, once the kernel has finished it');
    assert.is(p.readUInt32BE(24), 1000, 'the first segment\'s sequence number');
    assert.is(p[33]! & PSH, PSH, 'the last segment\'s push');
    assert.equal(p.subarray(20 + tcpHeader), Buffer.concat(segs.map((s) => s.subarray(20 + tcpHeader))), 'the payloads, in order');
  }
});

test('IPv6: the payload length and the pseudo-header with 128-bit addresses', () => {
  const { c, frames } = coalescer();
  for (let i = 0; i < 3; i++) c.push(segment({ seq: 5 + i * 1000, payload: 1000, v6: true }));
  c.flush();
  assert.is(frames.length, 1);
  assert.equal(header(frames[0]!), { flags: 1, gsoType: 4, hdrLen: 60, gsoSize: 1000, csumStart: 40, csumOffset: 16 });
  const p = finishedByKernel(frames[0]!);
  assert.is(p.readUInt16BE(4), 3020, 'IPv6 payload length');
  assert.ok(tcpChecksumValid(p));
});

test('a packet that cannot join is written as it came, after the run, in order', () => {
  const base = { payload: 1000 };
  const cases: [string, Segment][] = [
    ['another flow', { ...base, seq: 2000, sport: 40001 }],
    ['a gap in the sequence', { ...base, seq: 2500 }],
    ['another ACK number', { ...base, seq: 2000, ack: 8888 }],
    ['another window', { ...base, seq: 2000, window: 600 }],
    ['other options', { ...base, seq: 2000, options: Buffer.from([1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 2]) }],
    ['another TTL', { ...base, seq: 2000, ttl: 63 }],
    ['more payload than the first', { payload: 1001, seq: 2000 }],
    ['a FIN', { ...base, seq: 2000, flags: ACK | FIN }],
    ['no payload (a pure ACK)', { payload: 0, seq: 2000 }],
  ];
  for (const [what, odd] of cases) {
    const { c, frames } = coalescer();
    const opts = odd.options === undefined ? TIMESTAMPS : undefined;
    const first = segment({ seq: 0, payload: 1000, options: opts });
    const second = segment({ seq: 1000, payload: 1000, options: opts });
    const oddPacket = segment({ ...odd, options: odd.options ?? opts });
    c.push(first);
    c.push(second);
    c.push(oddPacket);
    c.flush();
    assert.is(frames.length, 2, what);
    assert.is(header(frames[0]!).gsoType, 1, `${what}: the run first`);
    assert.equal(frames[1]!.subarray(0, VNET_HDR_LEN), Buffer.alloc(VNET_HDR_LEN), `${what}: an empty header`);
    assert.equal(frames[1]!.subarray(VNET_HDR_LEN), oddPacket, `${what}: the packet unchanged`);
  }
});

test('a push or a short segment ends a run; what follows starts the next', () => {
  for (const [what, flags, payload] of [
    ['a push', ACK | PSH, 1000],
    ['a short segment', ACK, 400],
  ] as const) {
    const { c, frames } = coalescer();
    c.push(segment({ seq: 0, payload: 1000 }));
    c.push(segment({ seq: 1000, payload, flags }));
    c.push(segment({ seq: 1000 + payload, payload: 1000 }));
    c.push(segment({ seq: 2000 + payload, payload: 1000 }));
    c.flush();
    assert.is(frames.length, 2, what);
    assert.is(finishedByKernel(frames[0]!).length, 40 + 1000 + payload, `${what}: in the first run`);
    assert.is(finishedByKernel(frames[1]!).readUInt32BE(24), 1000 + payload, `${what}: the next run starts after it`);
    assert.is(c.takeMerged(), 2);
  }
});

test('a run stops short of 64 KiB; a lone segment goes with an empty header, its checksum untouched', () => {
  const { c, frames } = coalescer();
  const segs = Array.from({ length: 70 }, (_, i) => segment({ seq: i * 1400, payload: 1400 }));
  for (const s of segs) c.push(s);
  c.flush();
  assert.is(frames.length, 2);
  const first = finishedByKernel(frames[0]!);
  assert.ok(first.length <= MAX_IP_PACKET, `${first.length} bytes`);
  assert.is(first.length, 40 + 46 * 1400, 'as many segments as fit');
  assert.ok(tcpChecksumValid(first) && tcpChecksumValid(finishedByKernel(frames[1]!)));

  const lone = coalescer();
  const s = segment({ seq: 9, payload: 100 });
  lone.c.push(s);
  lone.c.flush();
  assert.equal(lone.frames, [Buffer.concat([Buffer.alloc(VNET_HDR_LEN), s])]);
  assert.is(lone.c.takeMerged(), 0);
});

test('not TCP, or TCP a run does not take (IP options, fragments, SYN): as they came, in order', () => {
  const { c, frames } = coalescer();
  const udp = segment({ seq: 0, payload: 100 });
  udp[9] = 17;
  const withOptions = Buffer.concat([segment({ seq: 100, payload: 100 }).subarray(0, 20), Buffer.alloc(4, 1), segment({ seq: 100, payload: 100 }).subarray(20)]);
  withOptions[0] = 0x46;
  withOptions.writeUInt16BE(withOptions.length, 2);
  const fragment = segment({ seq: 200, payload: 100 });
  fragment[6] = 0x20; // more fragments
  const syn = segment({ seq: 300, payload: 0, flags: SYN });
  const packets = [udp, withOptions, fragment, syn, segment({ seq: 301, payload: 100 })];
  for (const p of packets) c.push(p);
  c.flush();
  assert.equal(frames, packets.map((p) => Buffer.concat([Buffer.alloc(VNET_HDR_LEN), p])));
  assert.not.ok(c.push(Buffer.alloc(MAX_IP_PACKET + 1)), 'longer than any IP packet: refused');
  c.flush();
  assert.is(frames.length, packets.length);
});

test.run();
