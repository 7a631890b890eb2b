/**
 * The udp transport when the kernel's send buffer is full: in a network
 * namespace whose link is throttled (tc tbf at 1 Mbit/s), direct sends get
 * EAGAIN, the endpoint hands datagrams to dgram's queue instead (pending > 0,
 * the caller must not reuse them), send() says false at the sendQueue bound,
 * drain follows, and once the queue is empty sends go straight to the
 * kernel again. Needs root; skips (exit 77) elsewhere.
 */
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createTopology, exec, skipUnlessNetns, type Topology } from './helpers/netns.ts';
import { withTimeout } from './helpers/timeout.ts';

skipUnlessNetns(['ip', 'tc']);

const TSX = import.meta.resolve('tsx');
const FIXTURE = fileURLToPath(new URL('./fixtures/udp-backpressure.ts', import.meta.url));
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

async function rxPackets(t: Topology): Promise<number> {
  const out = (await exec(t.ns.server, 'cat', [`/sys/class/net/${t.dev.serverClientSide}/statistics/rx_packets`])).stdout;
  return Number(out.trim());
}

test.run();
