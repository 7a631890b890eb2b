/**
 * The udp transport's direct data path (core/udp-io.ts) on loopback: sends
 * reach the kernel within the call and hold nothing, and datagrams read in a
 * batch after dgram's wake-up arrive whole, in order, each in memory of its
 * own, with the sender's address. The shared datagram-transport checks are
 * in test/compliance/transport.test.ts; the fallback to dgram when the
 * kernel's send buffer is full is in transport-udp-netns.test.ts.
 */
import dgram from 'node:dgram';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import udp from '../plugins/transport-udp.ts';
import type { DatagramEndpoint, DatagramTransportPlugin } from '../core/types.ts';
import { openUdpIo, sockaddrIn } from '../core/udp-io.ts';
import { testContext } from './helpers/context.ts';
import { patterned, sleep } from './helpers/link-probe.ts';

const COUNT = 100;
// Small enough that COUNT of them fit a default receive buffer (net.core.rmem_default): loopback drops the rest.
const SIZE = 200;
const controller = new AbortController();
let transport: DatagramTransportPlugin;
const cleanups: Array<() => void> = [];

test.before(async () => {
  transport = (await udp.create({ mtu: 1420, recvBufferSize: 1 << 20, sendBufferSize: 1 << 20, sendQueue: 1024 }, testContext({ signal: controller.signal }))) as DatagramTransportPlugin;
});
test.after.each(() => {
  for (const c of cleanups.splice(0)) c();
});
test.after(async () => {
  await transport.close?.();
  controller.abort();
});

async function plainSocket(): Promise<dgram.Socket> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  cleanups.push(() => s.close());
  return s;
}

async function endpoint(): Promise<DatagramEndpoint> {
  const e = await transport.bind('127.0.0.1:0');
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

test(`${COUNT} sends in one tick: each is in the kernel when send() returns (pending 0), and all arrive in order`, async () => {
  const receiver = await plainSocket();
  const got: Buffer[] = [];
  receiver.on('message', (m) => got.push(m));
  const e = await endpoint();
  e.start({ datagram() {}, drain() {}, close() {} });
  const to = `127.0.0.1:${receiver.address().port}`;
  for (let i = 0; i < COUNT; i++) {
    assert.ok(e.send(patterned(i, SIZE), to), `send ${i}`);
    assert.is(e.pending, 0, `nothing held after send ${i}`);
  }
  await until(`${COUNT} datagrams`, () => got.length === COUNT);
  for (let i = 0; i < COUNT; i++) assert.ok(got[i]!.equals(patterned(i, SIZE)), `datagram ${i} intact and in order`);
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

test.run();
