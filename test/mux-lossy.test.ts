/**
 * The mux's lossy mode (core/mux.ts, for sessions over a datagram
 * transport): streams refused with a clear error, a lost UDP_OPEN repaired by
 * an implicit open, a lost UDP_CLOSE repaired by an idle timeout, late
 * datagrams after a close kept out, and pings that survive a lost PING.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { encodeAddress, encodeFrame, FRAME_HEADER, FrameType, Mux, type MuxOptions, type UdpAssociation } from '../core/mux.ts';
import type { Target } from '../core/types.ts';
import { memoryLogger } from './helpers/mux-pair.ts';
import { withTimeout } from './helpers/timeout.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The frame types in one payload. */
function frameTypes(payload: Buffer): number[] {
  const types: number[] = [];
  for (let at = 0; at + FRAME_HEADER <= payload.length; at += FRAME_HEADER + payload.readUInt16BE(at + 5)) types.push(payload[at]!);
  return types;
}

interface LossyPair {
  client: Mux;
  server: Mux;
  /** Every payload each side sent, as frame type lists. */
  up: number[][];
  down: number[][];
  close(): void;
}

/** Two lossy muxes; `drop` decides per payload (with its frame types) whether it is lost. */
function lossyPair(
  drop: (from: 'client' | 'server', types: number[]) => boolean,
  server: Partial<MuxOptions> = {},
): LossyPair {
  const up: number[][] = [];
  const down: number[][] = [];
  const pair = {} as LossyPair;
  const carry = (from: 'client' | 'server', payload: Buffer): boolean => {
    const types = frameTypes(payload);
    (from === 'client' ? up : down).push(types);
    if (drop(from, types)) return true;
    const copy = Buffer.from(payload);
    setImmediate(() => (from === 'client' ? pair.server : pair.client).receive(copy));
    return true;
  };
  pair.client = new Mux({ side: 'client', lossy: true, maxPayload: 1427, log: memoryLogger(), send: (p) => carry('client', p) });
  pair.server = new Mux({ side: 'server', lossy: true, maxPayload: 1427, log: memoryLogger(), send: (p) => carry('server', p), ...server });
  pair.up = up;
  pair.down = down;
  pair.close = () => {
    pair.client.close();
    pair.server.close();
  };
  return pair;
}

async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  await withTimeout(
    (async () => {
      while (!cond()) await sleep(5);
    })(),
    ms,
    what,
  );
}

const echoTarget: Target = { host: '192.0.2.10', port: 53 };

/** A server whose associations echo every datagram, and a record of them. */
function echoServer(): { opts: Partial<MuxOptions>; assocs: UdpAssociation[]; closed: number[] } {
  const out = { assocs: [] as UdpAssociation[], closed: [] as number[] } as ReturnType<typeof echoServer>;
  out.opts = {
    onUdp(assoc) {
      out.assocs.push(assoc);
      assoc.onMessage((to, payload) => assoc.send(to, payload));
      assoc.onClose(() => out.closed.push(assoc.id));
    },
  };
  return out;
}

test('streams are refused locally with UNSUPPORTED, and nothing is sent', async () => {
  const p = lossyPair(() => false);
  try {
    const err = await p.client.openStream({ host: 'example.com', port: 443 }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.instance(err, DshieldError);
    assert.is((err as DshieldError).code, ErrorCodes.UNSUPPORTED);
    assert.is((err as Error).message, 'streams (SOCKS5 CONNECT, HTTP proxy) need a stream transport: tcp or ws');
    await sleep(20);
    assert.equal(p.up, [], 'no OPEN went out');
  } finally {
    p.close();
  }
});

test('a lossy server answers OPEN with RST and never calls onOpen', async () => {
  let opened = 0;
  const p = lossyPair(() => false, { onOpen: () => opened++ });
  try {
    p.server.receive(encodeFrame(FrameType.OPEN, 1, encodeAddress({ host: '192.0.2.1', port: 80 })));
    await until(() => p.down.length > 0, 1000, 'an answer');
    assert.equal(p.down[0], [FrameType.RST]);
    assert.is(opened, 0);
  } finally {
    p.close();
  }
});

test('a lost UDP_OPEN: the first UDP_DATA opens the association on the server', async () => {
  const echo = echoServer();
  const p = lossyPair((from, types) => from === 'client' && types.includes(FrameType.UDP_OPEN), echo.opts);
  try {
    const udp = p.client.openUdp();
    const answers: string[] = [];
    udp.onMessage((_from, payload) => answers.push(payload.toString()));
    await sleep(10); // the UDP_OPEN leaves alone, and is lost
    assert.ok(p.up.some((t) => t.includes(FrameType.UDP_OPEN)), 'UDP_OPEN was sent');
    assert.is(echo.assocs.length, 0, 'and lost');
    udp.send(echoTarget, Buffer.from('one'));
    udp.send(echoTarget, Buffer.from('two'));
    await until(() => answers.length === 2, 1000, 'echoes');
    assert.equal(answers, ['one', 'two']);
    assert.is(echo.assocs.length, 1, 'one implicit open');
    assert.is(echo.assocs[0]!.id, udp.id);
  } finally {
    p.close();
  }
});

test('a lost UDP_CLOSE: the server forgets the idle association silently; new datagrams open it again', async () => {
  const echo = echoServer();
  const p = lossyPair((from, types) => from === 'client' && types.includes(FrameType.UDP_CLOSE), { ...echo.opts, udpIdleMs: 150 });
  try {
    const udp = p.client.openUdp();
    let answers = 0;
    udp.onMessage(() => answers++);
    udp.send(echoTarget, Buffer.from('a'));
    await until(() => answers === 1, 1000, 'an echo');
    const downBefore = p.down.length;
    await until(() => echo.closed.length === 1, 2000, 'the idle timeout');
    assert.is(p.down.length, downBefore, 'the server said nothing when it forgot the association');
    // The client still holds its association: its next datagram reopens it on the server.
    udp.send(echoTarget, Buffer.from('b'));
    await until(() => answers === 2, 1000, 'an echo after the idle timeout');
    assert.is(echo.assocs.length, 2);
    // A real close from the client (lost here) leaves the server to time out again.
    udp.close();
    await until(() => echo.closed.length === 2, 2000, 'the second idle timeout');
  } finally {
    p.close();
  }
});

test('after the client\'s UDP_CLOSE, a late UDP_DATA for that id does not reopen it', async () => {
  const echo = echoServer();
  const p = lossyPair(() => false, echo.opts);
  try {
    const udp = p.client.openUdp();
    udp.send(echoTarget, Buffer.from('a'));
    await until(() => echo.assocs.length === 1, 1000, 'the association');
    udp.close();
    await until(() => echo.closed.length === 1, 1000, 'the close');
    const address = encodeAddress(echoTarget);
    p.server.receive(encodeFrame(FrameType.UDP_DATA, udp.id, Buffer.concat([address, Buffer.from('late')])));
    await sleep(20);
    assert.is(echo.assocs.length, 1, 'not reopened');
  } finally {
    p.close();
  }
});

test('a ping survives a lost PING: it is resent until the PONG comes', async () => {
  let pingsDropped = 0;
  const p = lossyPair((from, types) => {
    if (from !== 'client' || !types.includes(FrameType.PING) || pingsDropped === 2) return false;
    pingsDropped++;
    return true;
  });
  try {
    const rtt = await withTimeout(p.client.ping(2000), 3000, 'the ping');
    assert.is(pingsDropped, 2);
    assert.ok(rtt >= 0);
    assert.is(p.up.filter((t) => t.includes(FrameType.PING)).length, 3, 'sent three times');
  } finally {
    p.close();
  }
});

test('a ping with no answer still times out, and stops resending', async () => {
  const p = lossyPair((from, types) => from === 'client' && types.includes(FrameType.PING));
  try {
    const err = await p.client.ping(400).then(
      () => null,
      (e: unknown) => e,
    );
    assert.is((err as DshieldError).code, ErrorCodes.TUNNEL_DOWN);
    const sent = p.up.length;
    await sleep(300);
    assert.is(p.up.length, sent, 'no resends after the timeout');
  } finally {
    p.close();
  }
});

test('TUN packets: a full-size one goes out within sendPacket, framed in the session\'s memory; small ones sent in one tick share a payload', async () => {
  const memory = Buffer.alloc(1427);
  const sent: Buffer[] = [];
  const got: Buffer[] = [];
  const inMemory: boolean[] = [];
  const mux = new Mux({
    side: 'client',
    lossy: true,
    maxPayload: 1427,
    maxPacket: 1420,
    log: memoryLogger(),
    payloadBuffer: () => memory,
    send: (p) => {
      inMemory.push(p.buffer === memory.buffer && p.byteOffset === 0);
      sent.push(Buffer.from(p));
      return true;
    },
  });
  const peer = new Mux({ side: 'server', lossy: true, maxPayload: 1427, maxPacket: 1420, log: memoryLogger(), send: () => true, onPacket: (p) => void got.push(Buffer.from(p)) });
  try {
    const big = Buffer.alloc(1420, 0xab);
    assert.ok(mux.sendPacket(big));
    assert.is(sent.length, 1, 'sent before sendPacket returned');
    assert.is(sent[0]!.length, FRAME_HEADER + 1420, 'one PACKET frame');
    assert.ok(inMemory[0], 'assembled in the memory payloadBuffer() gave');
    big.fill(0); // the caller may reuse its buffer at once
    for (let i = 0; i < 3; i++) assert.ok(mux.sendPacket(Buffer.alloc(52, i + 1)));
    assert.is(sent.length, 1, 'small packets wait for the flush');
    await sleep(0);
    assert.is(sent.length, 2, 'and go out together');
    assert.equal(frameTypes(sent[1]!), [FrameType.PACKET, FrameType.PACKET, FrameType.PACKET]);
    // Queued small packets first, then a big one in the same tick: the big one waits its turn.
    assert.ok(mux.sendPacket(Buffer.alloc(40, 7)));
    assert.ok(mux.sendPacket(Buffer.alloc(1420, 8)));
    assert.is(sent.length, 2, 'behind a queued packet, a big one is queued too');
    await sleep(0);
    assert.is(sent.length, 4);
    for (const payload of sent) peer.receive(payload);
    assert.equal(got.map((p) => [p.length, p[0]]), [[1420, 0xab], [52, 1], [52, 2], [52, 3], [40, 7], [1420, 8]]);
  } finally {
    mux.close();
    peer.close();
  }
});

test('a packet sent alone (read by itself from TUN) goes out within sendPacket, over streams too, unless something waits before it', async () => {
  for (const lossy of [true, false]) {
    const memory = Buffer.alloc(lossy ? 1427 : 65535);
    const sent: number[][] = [];
    const mux = new Mux({
      side: 'client',
      lossy,
      maxPayload: memory.length,
      maxPacket: 1420,
      log: memoryLogger(),
      payloadBuffer: () => memory,
      send: (p) => {
        sent.push(frameTypes(p));
        return true;
      },
    });
    try {
      assert.ok(mux.sendPacket(Buffer.alloc(84, 1), true));
      assert.is(sent.length, 1, `lossy ${lossy}: a small packet alone is sent before sendPacket returns`);
      assert.ok(mux.sendPacket(Buffer.alloc(84, 2)));
      assert.ok(mux.sendPacket(Buffer.alloc(84, 3), true));
      assert.is(sent.length, 1, `lossy ${lossy}: behind a queued packet, even one alone waits`);
      await sleep(0);
      assert.equal(sent, [[FrameType.PACKET], [FrameType.PACKET, FrameType.PACKET]], `lossy ${lossy}: the queued two share a payload`);
    } finally {
      mux.close();
    }
  }
});

test.run();
