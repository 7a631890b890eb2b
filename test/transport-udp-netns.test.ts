/**
 * The udp transport where the kernel pushes back, in network namespaces:
 *
 * - its send buffer is full: on a link throttled by tc tbf (1 Mbit/s),
 *   direct sends get EAGAIN, the endpoint hands datagrams to dgram's queue
 *   instead (pending > 0, the caller must not reuse them), send() says false
 *   at the sendQueue bound, drain follows, and once the queue is empty sends
 *   go straight to the kernel again (gso off: one sendto each);
 * - a GSO send whose segment does not fit the path MTU (a link of MTU 1200,
 *   datagrams of 1400): the kernel refuses it, the endpoint sends those one
 *   by one (the kernel fragments them) and goes on batching smaller ones.
 *
 * Needs root; skips (exit 77) elsewhere.
 */
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createTopology, exec, skipUnlessNetns, spawnIn, stopChild, type Topology } from './helpers/netns.ts';
import { withTimeout } from './helpers/timeout.ts';

skipUnlessNetns(['ip', 'tc']);

const TSX = import.meta.resolve('tsx');
const FIXTURE = fileURLToPath(new URL('./fixtures/udp-backpressure.ts', import.meta.url));
const GSO_FIXTURE = fileURLToPath(new URL('./fixtures/udp-gso-mtu.ts', import.meta.url));
let topo: Topology | undefined;

test.after(() => {
  topo?.cleanup();
});

test('a full send buffer: dgram queues (pending > 0), false at sendQueue, drain, then direct again', async () => {
  topo = await withTimeout(createTopology(), 20_000, 'createTopology');
  await exec(topo.ns.client, 'tc', ['qdisc', 'add', 'dev', topo.dev.client, 'root', 'tbf', 'rate', '1mbit', 'burst', '16k', 'latency', '400ms']);
  const before = await rxPackets(topo);
  const r = await exec(topo.ns.client, process.execPath, ['--import', TSX, FIXTURE, `${topo.addr.serverClientSide}:9`], { timeout: 30_000 });
  const seen = JSON.parse(r.stdout.trim().split('\n').pop()!) as {
    accepted: number;
    heldFirstAt: number;
    pendingAtFalse: number;
    drains: number;
    okAfter: boolean;
    pendingAfter: number;
  };
  assert.ok(seen.heldFirstAt > 0, `some datagrams went straight to the kernel before it was full (${JSON.stringify(seen)})`);
  assert.is(seen.pendingAtFalse, 32, 'false exactly when sendQueue datagrams wait in dgram');
  assert.is(seen.accepted, seen.heldFirstAt + 31, 'every datagram after the first held one waited in the queue');
  assert.ok(seen.drains >= 1, 'drain after false');
  assert.ok(seen.okAfter, 'send works after drain');
  assert.is(seen.pendingAfter, 0, 'and goes straight to the kernel again');
  // Everything send() took left the namespace: the direct ones, the queued ones and the last one.
  const deadline = Date.now() + 10_000;
  let arrived = 0;
  while ((arrived = (await rxPackets(topo)) - before) < seen.accepted + 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.ok(arrived >= seen.accepted + 1, `${arrived} packets reached the server's side, ${seen.accepted + 1} were sent`);
});

test('a GSO send refused by the path MTU: those datagrams go one by one, smaller ones still batch, all arrive', async () => {
  topo?.cleanup();
  topo = await withTimeout(createTopology(), 20_000, 'createTopology');
  await exec(topo.ns.client, 'ip', ['link', 'set', 'dev', topo.dev.client, 'mtu', '1200']);
  const port = 41_234;
  // The receiver: a plain dgram socket in the server namespace that prints each datagram's first 4 bytes and size.
  const receiver = spawnIn(topo.ns.server, process.execPath, [
    '-e',
    `const s = require('node:dgram').createSocket('udp4');
     s.on('message', (m) => console.log(m.readUInt32BE(0) + ' ' + m.length));
     s.bind(${port}, '${topo.addr.serverClientSide}', () => console.log('READY'));
     setTimeout(() => process.exit(0), 20000);`,
  ]);
  try {
    let out = '';
    receiver.stdout!.on('data', (c: Buffer) => void (out += c.toString()));
    await withTimeout(
      new Promise<void>((resolve) => receiver.stdout!.on('data', () => out.includes('READY') && resolve())),
      10_000,
      'the receiver',
    );
    const r = await exec(topo.ns.client, process.execPath, ['--import', TSX, GSO_FIXTURE, `${topo.addr.serverClientSide}:${port}`], { timeout: 30_000 });
    const seen = JSON.parse(r.stdout.trim().split('\n').pop()!) as { batchingAtFirst: boolean; batching: boolean; batchLimit: number; gsoSends: number };
    assert.ok(seen.batchingAtFirst, `the endpoint batched at first (${JSON.stringify(seen)})`);
    assert.ok(seen.batching, 'and still does after the refusal');
    assert.ok(seen.batchLimit < 1400 && seen.batchLimit >= 1000, `only datagrams of 1400 bytes and more go one by one (below ${seen.batchLimit + 1})`);
    assert.is(seen.gsoSends, 1, 'the 1000-byte burst left in one GSO send');
    const deadline = Date.now() + 5_000;
    const lines = () => out.split('\n').filter((l) => /^\d+ \d+$/.test(l));
    while (lines().length < 20 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 50));
    assert.equal(
      lines(),
      Array.from({ length: 20 }, (_, i) => `${i} ${i < 10 ? 1400 : 1000}`),
      'all 20 arrived whole and in order',
    );
  } finally {
    await stopChild(receiver);
  }
});

async function rxPackets(t: Topology): Promise<number> {
  const out = (await exec(t.ns.server, 'cat', [`/sys/class/net/${t.dev.serverClientSide}/statistics/rx_packets`])).stdout;
  return Number(out.trim());
}

test.run();
