/**
 * core/mux.ts PACKET frames (TUN mode): IP packets both ways, the size limit
 * (maxPacket, the TUN MTU) on both sides, congestion drops instead of an
 * unbounded queue, and packets keep flowing beside a busy stream.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { encodeFrame, FRAME_HEADER, FrameType, isPacketsOnly, type OpenRequest } from '../core/mux.ts';
import { muxPair, type MuxPair } from './helpers/mux-pair.ts';
import { withTimeout } from './helpers/timeout.ts';

const MTU = 1420;

/** A pair whose server collects packets (and echoes them back when asked). */
function pair(opts: { echo?: boolean; onOpen?: (req: OpenRequest) => void } = {}) {
  const toServer: Buffer[] = [];
  const toClient: Buffer[] = [];
  let p: MuxPair;
  p = muxPair({
    client: { maxPacket: MTU, onPacket: (pkt) => toClient.push(Buffer.from(pkt)) },
    server: {
      maxPacket: MTU,
      onPacket: (pkt) => {
        toServer.push(Buffer.from(pkt));
        if (opts.echo) p.server.sendPacket(pkt);
      },
      onOpen: opts.onOpen,
    },
  });
  return { p, toServer, toClient };
}

function until(check: () => boolean, ms: number, what: string): Promise<void> {
  return withTimeout(
    new Promise<void>((resolve) => {
      const tick = () => (check() ? resolve() : setTimeout(tick, 5));
      tick();
    }),
    ms,
    what,
  );
}

test('packets go both ways, byte for byte, and are copied on send', async () => {
  const { p, toServer, toClient } = pair({ echo: true });
  try {
    const packets = [randomBytes(20), randomBytes(MTU), randomBytes(576)];
    const originals = packets.map((b) => Buffer.from(b));
    for (const pkt of packets) assert.ok(p.client.sendPacket(pkt));
    for (const pkt of packets) pkt.fill(0); // the caller may reuse its buffer at once
    await until(() => toClient.length === 3, 2000, 'echoed packets');
    assert.equal(toServer, originals);
    assert.equal(toClient, originals);
    assert.ok(p.client.bytesOut >= 20 + MTU + 576, 'packets count as bytes out');
  } finally {
    p.close();
  }
});

test('a packet over maxPacket is refused by the sender and dropped by the receiver', async () => {
  const { p, toServer } = pair();
  try {
    assert.is(p.client.sendPacket(randomBytes(MTU + 1)), false);
    assert.is(p.client.sendPacket(Buffer.alloc(0)), false, 'empty');
    // A peer that ignores the limit: its frame is dropped, the next one gets through.
    p.server.receive(Buffer.concat([encodeFrame(FrameType.PACKET, 0, randomBytes(MTU + 1)), encodeFrame(FrameType.PACKET, 0, Buffer.from([0x45]))]));
    assert.equal(toServer, [Buffer.from([0x45])]);
    assert.ok(p.serverLog.lines.some((l) => l.level === 'debug' && /malformed/.test(l.msg)), 'logged at debug');
    p.server.receive(encodeFrame(FrameType.PACKET, 7, Buffer.from([0x45]))); // PACKET ids are 0
    assert.is(toServer.length, 1);
  } finally {
    p.close();
  }
});

test('congested: packets queue up to a bound, then sendPacket says false; the queued ones arrive in order', async () => {
  const { p, toServer } = pair();
  try {
    p.up.block();
    // Let the first flush hit the blocked pipe, so the mux knows it is congested.
    assert.ok(p.client.sendPacket(Buffer.alloc(100, 1)));
    await new Promise((r) => setImmediate(r));
    let accepted = 1;
    let refused = 0;
    for (let i = 0; i < 2000; i++) {
      const pkt = Buffer.alloc(MTU);
      pkt.writeUInt32BE(i, 0);
      if (p.client.sendPacket(pkt)) accepted++;
      else refused++;
    }
    assert.ok(refused > 0, 'some packets were dropped');
    assert.ok(accepted * MTU <= 300 * 1024, `queue stays bounded (${accepted} packets accepted)`);
    assert.ok(p.client.bufferedAmount <= 300 * 1024, `bufferedAmount ${p.client.bufferedAmount}`);
    p.up.unblock();
    await until(() => toServer.length === accepted, 3000, 'queued packets');
    const seq = toServer.slice(1).map((b) => b.readUInt32BE(0));
    assert.equal(seq, [...seq].sort((a, b) => a - b), 'in order');
    assert.ok(p.client.sendPacket(Buffer.alloc(MTU)), 'accepted again once drained');
  } finally {
    p.close();
  }
});

for (const [what, maxPayload] of [['stream-sized payloads', 65518], ['datagram-sized payloads', MTU + 7]] as const) {
  test(`${what}: a burst of 1,000 packets in one synchronous run (a TUN batch) is sent whole, in order, none dropped`, async () => {
    // Mixed sizes, as a fragmented UDP flood gives: a large packet, then a small fragment.
    // The link takes all of it (a UDP socket with room): nothing is congested, so nothing may drop.
    const toServer: Buffer[] = [];
    const p = muxPair({
      up: { highWater: 8 * 1024 * 1024 },
      client: { maxPacket: MTU, maxPayload, lossy: maxPayload < 65518 },
      server: { maxPacket: MTU, maxPayload, lossy: maxPayload < 65518, onPacket: (pkt) => toServer.push(Buffer.from(pkt)) },
    });
    try {
      const sizes = Array.from({ length: 1000 }, (_, i) => (i % 2 === 0 ? MTU : 28));
      sizes.forEach((n, i) => {
        const pkt = Buffer.alloc(n, i & 0xff);
        pkt.writeUInt16BE(i, 0);
        assert.ok(p.client.sendPacket(pkt), `packet ${i} accepted`);
      });
      await until(() => toServer.length === sizes.length, 5000, 'every packet');
      assert.equal(
        toServer.map((b) => b.readUInt16BE(0)),
        sizes.map((_, i) => i),
        'in order',
      );
      assert.equal(
        toServer.map((b) => b.length),
        sizes,
        'at their sizes',
      );
    } finally {
      p.close();
    }
  });
}

test('packets flow beside a bulk stream, and not after close', async () => {
  const { p, toServer } = pair({
    onOpen(req) {
      const s = req.accept();
      s.on('data', () => {});
      s.on('error', () => {});
    },
  });
  try {
    const stream: Duplex = await withTimeout(p.client.openStream({ host: 'example.com', port: 80 }), 2000, 'open');
    stream.on('error', () => {});
    const chunk = randomBytes(64 * 1024);
    let writing = true;
    const pump = () => {
      while (writing && stream.write(chunk));
      if (writing) stream.once('drain', pump);
    };
    pump();
    for (let i = 0; i < 50; i++) {
      p.client.sendPacket(Buffer.alloc(200, i));
      await new Promise((r) => setImmediate(r));
    }
    await until(() => toServer.length >= 40, 3000, 'packets beside the stream');
    writing = false;
    stream.destroy();
    p.client.close();
    assert.is(p.client.sendPacket(Buffer.alloc(100)), false, 'closed mux refuses');
  } finally {
    p.close();
  }
});

test('isPacketsOnly: a run of whole PACKET frames under the limit, each body shown to accept; anything else is not', () => {
  const a = encodeFrame(FrameType.PACKET, 0, randomBytes(40));
  const b = encodeFrame(FrameType.PACKET, 0, randomBytes(MTU));
  const run = Buffer.concat([Buffer.alloc(3), a, b]);
  const seen: Array<[number, number]> = [];
  const accept = (_buf: Buffer, at: number, length: number, into: Array<[number, number]>) => (into.push([at, length]), true);
  assert.ok(isPacketsOnly(run, 3, run.length, MTU, accept, seen), 'two frames');
  assert.equal(seen, [[3 + FRAME_HEADER, 40], [3 + a.length + FRAME_HEADER, MTU]], 'accept saw each body, in place');
  assert.ok(!isPacketsOnly(run, 3, run.length, MTU - 1, accept, []), 'a body over maxPacket');
  assert.ok(!isPacketsOnly(run, 3, run.length - 1, MTU, accept, []), 'the last frame cut short');
  assert.ok(!isPacketsOnly(run, 3, 3, MTU, accept, []), 'nothing at all');
  assert.ok(!isPacketsOnly(run, 3, run.length, MTU, () => false), 'accept refused one');
  for (let i = 1; i <= 4; i++) {
    const other = Buffer.from(run);
    other[3 + a.length + i] = 0x80;
    assert.ok(!isPacketsOnly(other, 3, other.length, MTU), `a stream id with byte ${i} set: not a packet frame`);
  }
  const data = Buffer.concat([a, encodeFrame(FrameType.DATA, 0, randomBytes(10))]);
  assert.ok(!isPacketsOnly(data, 0, data.length, MTU), 'another frame type');
  assert.ok(!isPacketsOnly(encodeFrame(FrameType.PACKET, 0), 0, FRAME_HEADER, MTU), 'an empty packet');
});

test.run();
