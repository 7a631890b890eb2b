/**
 * The udp transport's direct data path (core/udp-io.ts) on loopback: sends
 * reach the kernel within the call (gso: false) or at the end of the
 * microtask, a burst to one peer in one GSO send (core/segment-batch.ts),
 * and hold nothing; datagrams read in a batch after dgram's wake-up arrive
 * whole, in order, each in memory of its own, with the sender's address.
 * The shared datagram-transport checks are in
 * test/compliance/transport.test.ts; the fallback to dgram when the kernel's
 * send buffer is full, and a GSO send the path MTU refuses, are in
 * transport-udp-netns.test.ts.
 */
import dgram from 'node:dgram';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import udp from '../plugins/transport-udp.ts';
import type { DatagramEndpoint, DatagramTransportPlugin } from '../core/types.ts';
import { openUdpIo, sockaddrIn, udpIoOnFd } from '../core/udp-io.ts';
import { AF_INET, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, libc } from '../core/tun/libc.ts';
import { testContext } from './helpers/context.ts';
import { patterned, sleep } from './helpers/link-probe.ts';

const COUNT = 100;
// Small enough that COUNT of them fit a default receive buffer (net.core.rmem_default): loopback drops the rest.
const SIZE = 200;
const controller = new AbortController();
let transport: DatagramTransportPlugin;
let sendtoOnly: DatagramTransportPlugin;
const cleanups: Array<() => void> = [];

test.before(async () => {
  const options = { mtu: 1420, recvBufferSize: 1 << 20, sendBufferSize: 1 << 20, sendQueue: 1024 };
  transport = (await udp.create({ ...options, gso: true }, testContext({ signal: controller.signal }))) as DatagramTransportPlugin;
  sendtoOnly = (await udp.create({ ...options, gso: false }, testContext({ signal: controller.signal }))) as DatagramTransportPlugin;
});
test.after.each(() => {
  for (const c of cleanups.splice(0)) c();
});
test.after(async () => {
  await transport.close?.();
  await sendtoOnly.close?.();
  controller.abort();
});

async function plainSocket(): Promise<dgram.Socket> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  cleanups.push(() => s.close());
  return s;
}

async function endpoint(t = transport): Promise<DatagramEndpoint> {
  const e = await t.bind('127.0.0.1:0');
  cleanups.push(() => e.close());
  return e;
}

async function until(what: string, ok: () => boolean, ms = 5_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) assert.unreachable(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

test('sockaddrIn encodes IPv4 only, port and address in network order', () => {
  const sa = sockaddrIn('10.1.2.3', 0x1234)!;
  assert.is(sa.length, 16);
  assert.is(sa.readUInt16BE(2), 0x1234);
  assert.equal([...sa.subarray(4, 8)], [10, 1, 2, 3]);
  assert.is(sockaddrIn('::1', 80), undefined);
  assert.is(sockaddrIn('1.2.3.256', 80), undefined);
  assert.is(sockaddrIn('1.2.3', 80), undefined);
});

test('IPv4 sockets get direct I/O; IPv6 sockets stay on dgram', async () => {
  const v4 = await plainSocket();
  assert.ok(openUdpIo(v4), 'udp4');
  const v6 = dgram.createSocket('udp6');
  await new Promise<void>((resolve) => v6.bind(0, '::1', resolve));
  cleanups.push(() => v6.close());
  assert.is(openUdpIo(v6), undefined);
});

test('direct I/O sends the first `length` bytes it is given, and refuses a length past the datagram', async () => {
  const receiver = await plainSocket();
  const got: Buffer[] = [];
  receiver.on('message', (m) => got.push(m));
  const sender = await plainSocket();
  const io = openUdpIo(sender)!;
  const to = sockaddrIn('127.0.0.1', receiver.address().port)!;
  const buf = patterned(1, 100);
  assert.is(io.send(buf, to, 40), 0);
  assert.is(io.send(buf, to), 0, 'all of it by default');
  assert.throws(() => io.send(buf, to, 101), RangeError);
  assert.throws(() => io.send(buf, to, -1), RangeError);
  await until('two datagrams', () => got.length === 2);
  assert.ok(got[0]!.equals(buf.subarray(0, 40)), 'the first 40 bytes');
  assert.ok(got[1]!.equals(buf), 'the whole buffer');
  await sleep(20);
  assert.is(got.length, 2, 'nothing for the refused lengths');
});

test(`gso: false: ${COUNT} sends in one tick: each is in the kernel when send() returns (pending 0), and all arrive in order`, async () => {
  const receiver = await plainSocket();
  const got: Buffer[] = [];
  receiver.on('message', (m) => got.push(m));
  const e = await endpoint(sendtoOnly);
  assert.not.ok(gsoOf(e).batching, 'no batching');
  e.start({ datagram() {}, drain() {}, close() {} });
  const to = `127.0.0.1:${receiver.address().port}`;
  for (let i = 0; i < COUNT; i++) {
    assert.ok(e.send(patterned(i, SIZE), to), `send ${i}`);
    assert.is(e.pending, 0, `nothing held after send ${i}`);
  }
  await until(`${COUNT} datagrams`, () => got.length === COUNT);
  for (let i = 0; i < COUNT; i++) assert.ok(got[i]!.equals(patterned(i, SIZE)), `datagram ${i} intact and in order`);
  assert.is(gsoOf(e).gsoSends, 0, 'one sendto each');
});

/** White box: the endpoint's GSO counters and its direct I/O. */
function gsoOf(e: DatagramEndpoint) {
  return e as unknown as {
    batching: boolean;
    gsoSends: number;
    gsoDatagrams: number;
    io: { sendSegments(buf: Uint8Array, length: number, segmentSize: number, to: Uint8Array): number; send(d: Uint8Array, to: Uint8Array): number };
  };
}

/** A plain receiver and a started endpoint (gso on) sending to it, with its internals. */
async function gsoRig() {
  const receiver = await plainSocket();
  const got: Buffer[] = [];
  receiver.on('message', (m) => got.push(m));
  const e = await endpoint();
  e.start({ datagram() {}, drain() {}, close() {} });
  return { got, e, g: gsoOf(e), to: `127.0.0.1:${receiver.address().port}` };
}

/** Sizes of a burst: runs of one size (a shorter last one), a size change upwards, a lone tiny one, a run longer than 64. */
const BURST = [
  ...Array(10).fill(1200),
  700,
  ...Array(5).fill(1457),
  1457,
  100,
  ...Array(70).fill(120),
  29,
  ...Array(3).fill(1000),
];

test('a burst in one tick leaves in GSO sends: every datagram arrives whole, at its own size, in order', async () => {
  const receiver = await plainSocket();
  receiver.setRecvBufferSize(1 << 20);
  const got: Buffer[] = [];
  receiver.on('message', (m) => got.push(m));
  const e = await endpoint();
  const g = gsoOf(e);
  assert.ok(g.batching, 'this kernel batches (UDP GSO on loopback)');
  e.start({ datagram() {}, drain() {}, close() {} });
  const to = `127.0.0.1:${receiver.address().port}`;
  BURST.forEach((size, i) => {
    assert.ok(e.send(patterned(i, size), to), `send ${i}`);
    assert.is(e.pending, 0, `nothing held after send ${i}`);
  });
  await until(`${BURST.length} datagrams`, () => got.length === BURST.length);
  BURST.forEach((size, i) => assert.ok(got[i]!.equals(patterned(i, size)), `datagram ${i} (${size} bytes) intact and in order`));
  // 10+1 | 5+1+1 (the 100 is shorter: it ends the run) | 64 | 6+1 | 3: five GSO sends.
  assert.is(g.gsoSends, 5, 'five GSO sends');
  assert.is(g.gsoDatagrams, BURST.length, 'carrying every datagram');
});

test('datagrams to two peers in one tick: each peer gets its own in order', async () => {
  const a = await plainSocket();
  const b = await plainSocket();
  const gotA: Buffer[] = [];
  const gotB: Buffer[] = [];
  a.on('message', (m) => gotA.push(m));
  b.on('message', (m) => gotB.push(m));
  const e = await endpoint();
  e.start({ datagram() {}, drain() {}, close() {} });
  const toA = `127.0.0.1:${a.address().port}`;
  const toB = `127.0.0.1:${b.address().port}`;
  // Runs of three to each, then alternating: a batch never mixes peers.
  const plan = [...'aaabbbaaabbb', ...'ababababab'].map((p, i) => ({ to: p === 'a' ? toA : toB, i }));
  for (const { to, i } of plan) e.send(patterned(i, 500), to);
  const wantA = plan.filter((p) => p.to === toA).map((p) => p.i);
  const wantB = plan.filter((p) => p.to === toB).map((p) => p.i);
  await until('both peers', () => gotA.length === wantA.length && gotB.length === wantB.length);
  assert.equal(gotA.map((m) => m.readUInt32BE(0)), wantA, 'peer a, in order');
  assert.equal(gotB.map((m) => m.readUInt32BE(0)), wantB, 'peer b, in order');
  assert.is(gsoOf(e).gsoSends, 4, 'the four runs of three went in GSO sends; the alternating ones one by one');
});

test('the kernel refuses GSO (EIO: no checksum offload): the batch goes one by one and batching stops', async () => {
  const { got, e, g, to } = await gsoRig();
  let refused = 0;
  g.io.sendSegments = () => (refused++, 5); // EIO
  for (let i = 0; i < 20; i++) e.send(patterned(i, 400), to);
  await until('20 datagrams', () => got.length === 20);
  assert.is(refused, 1, 'tried once');
  assert.not.ok(g.batching, 'no more batching');
  for (let i = 20; i < 40; i++) e.send(patterned(i, 400), to);
  await until('40 datagrams', () => got.length === 40);
  assert.is(refused, 1, 'not tried again');
  for (let i = 0; i < 40; i++) assert.is(got[i]!.readUInt32BE(0), i, `datagram ${i} in order`);
});

test('a GSO send refused as any send would be (EPERM: a firewall): the batch is lost quietly and batching goes on', async () => {
  const { got, e, g, to } = await gsoRig();
  const real = g.io.sendSegments.bind(g.io);
  let calls = 0;
  g.io.sendSegments = (buf, length, segmentSize, dest) => (++calls === 1 ? 1 : real(buf, length, segmentSize, dest)); // EPERM once
  for (let i = 0; i < 10; i++) assert.ok(e.send(patterned(i, 400), to), `send ${i}`);
  await sleep(20);
  for (let i = 10; i < 20; i++) e.send(patterned(i, 400), to);
  await until('the second burst', () => got.length === 10);
  assert.equal(got.map((m) => m.readUInt32BE(0)), Array.from({ length: 10 }, (_, i) => 10 + i), 'only the second burst arrived');
  assert.ok(g.batching, 'still batching');
  assert.is(g.gsoSends, 1, 'the second burst in one GSO send');
});

test('the kernel refuses a segment size (EMSGSIZE: larger than the path MTU): that size and larger go one by one, smaller ones still batch', async () => {
  const { got, e, g, to } = await gsoRig();
  const real = g.io.sendSegments.bind(g.io);
  const tried: number[] = [];
  g.io.sendSegments = (buf, length, segmentSize, dest) => {
    tried.push(segmentSize);
    return segmentSize >= 1000 ? 90 : real(buf, length, segmentSize, dest); // EMSGSIZE
  };
  const first = Array(8).fill(1200);
  first.forEach((n, i) => e.send(patterned(i, n), to));
  await until('the refused batch, one by one', () => got.length === first.length);
  // A later burst: 1300 and 1200 (not below the refused size) go one by one; 900 still batches.
  const then = [...Array(8).fill(1300), ...Array(8).fill(1200), ...Array(8).fill(900)];
  then.forEach((n, i) => e.send(patterned(first.length + i, n), to));
  const sizes = [...first, ...then];
  await until(`${sizes.length} datagrams`, () => got.length === sizes.length);
  sizes.forEach((n, i) => assert.ok(got[i]!.equals(patterned(i, n)), `datagram ${i} intact and in order`));
  assert.equal(tried, [1200, 900], 'after 1200 was refused, 1300 and 1200 were not tried; 900 was');
  assert.ok(g.batching, 'still batching below that size');
  assert.is(g.gsoSends, 1, 'the 900-byte run went in one');
});

test(`a burst of ${COUNT} from a plain socket arrives whole and in order, each datagram in its own memory, with the sender's address`, async () => {
  const e = await endpoint();
  const got: Array<{ data: Buffer; from: string }> = [];
  e.start({ datagram: (data, from) => void got.push({ data, from }), drain() {}, close() {} });
  const sender = await plainSocket();
  const port = Number(e.localAddress.split(':')[1]);
  // Queued in the kernel before the endpoint's event loop turns: one wake-up, the rest read in batches.
  for (let i = 0; i < COUNT; i++) sender.send(patterned(i, SIZE), port, '127.0.0.1');
  await until(`${COUNT} datagrams`, () => got.length === COUNT);
  const from = `127.0.0.1:${sender.address().port}`;
  // The receiver may keep and write into what it got: scribbling on each must not change any other.
  for (const g of got) g.data.fill(0xee, 4);
  for (let i = 0; i < COUNT; i++) {
    assert.is(got[i]!.from, from, `sender of ${i}`);
    assert.is(got[i]!.data.length, SIZE, `length of ${i}`);
    assert.is(got[i]!.data.readUInt32BE(0), i, `datagram ${i} in order and untouched by the others`);
  }
});

test('a lone datagram is not followed by a batch read; the second of a burst starts one', async () => {
  const e = await endpoint();
  const got: Buffer[] = [];
  e.start({ datagram: (data) => void got.push(data), drain() {}, close() {} });
  // White box: count the direct reads behind dgram's deliveries.
  const io = (e as unknown as { io: { receive(buf: Uint8Array): number } }).io;
  const receive = io.receive.bind(io);
  let reads = 0;
  io.receive = (buf) => {
    reads++;
    return receive(buf);
  };
  const sender = await plainSocket();
  const port = Number(e.localAddress.split(':')[1]);
  for (let i = 0; i < 5; i++) {
    sender.send(patterned(i, SIZE), port, '127.0.0.1');
    await until(`lone datagram ${i}`, () => got.length === i + 1);
    await sleep(20);
  }
  assert.is(reads, 0, 'datagrams 20 ms apart: dgram delivered each, no read found the queue empty');
  for (let i = 0; i < COUNT; i++) sender.send(patterned(i, SIZE), port, '127.0.0.1');
  await until(`${COUNT} datagrams`, () => got.length === 5 + COUNT);
  assert.ok(reads > 0, 'a burst is read in batches');
  for (let i = 0; i < COUNT; i++) assert.is(got[5 + i]!.readUInt32BE(0), i, `burst datagram ${i} in order`);
});

test('a send the kernel refuses (broadcast without SO_BROADCAST) is lost quietly: no throw, the endpoint goes on', async () => {
  const receiver = await plainSocket();
  const got: Buffer[] = [];
  receiver.on('message', (m) => got.push(m));
  const e = await endpoint();
  e.start({ datagram() {}, drain() {}, close() {} });
  assert.ok(e.send(patterned(1, 10), '255.255.255.255:9'), 'refused datagram: send() still true (UDP may lose it)');
  assert.is(e.pending, 0);
  assert.ok(e.send(patterned(2, 10), `127.0.0.1:${receiver.address().port}`));
  await until('the next datagram', () => got.length === 1);
  assert.is(got[0]!.readUInt32BE(0), 2);
});

test('direct reads name each datagram\'s sender, as senders alternate and repeat', async () => {
  const c = libc();
  const fd = c.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  assert.ok(fd >= 0, 'a socket');
  cleanups.push(() => void c.close(fd));
  const address = sockaddrIn('127.0.0.1', 0)!;
  assert.is(c.bind(fd, address, address.length), 0, 'bound');
  assert.is(c.getsockname(fd, address, new Uint32Array([address.length])), 0);
  const port = address.readUInt16BE(2);
  const io = udpIoOnFd(fd)!;
  assert.ok(io !== undefined, 'direct I/O on this platform');
  const a = await plainSocket();
  const b = await plainSocket();
  const buf = Buffer.alloc(64);
  // Repeats and switches: each read must name its own sender, not the one before.
  for (const [i, s] of [a, a, b, a, b, b, a].entries()) {
    s.send(patterned(i, 8), port, '127.0.0.1');
    let n = -1;
    await until(`datagram ${i}`, () => (n = io.receive(buf)) >= 0);
    assert.is(n, 8);
    assert.is(buf.readUInt32BE(0), i, `datagram ${i}`);
    assert.is(io.from, `127.0.0.1:${s.address().port}`, `sender of datagram ${i}`);
  }
});

test.run();
