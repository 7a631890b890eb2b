/**
 * The ws transport's own WebSocket: the frame reader (core/ws-reader.ts) on
 * its own, and the transport against the `ws` library, an independent
 * implementation of RFC 6455, in both roles.
 *
 * What must hold: the reader gives the same messages however the bytes are
 * split, unmasks a client's frames, puts fragments together around control
 * frames, drops text, and stops with the right close code at the first
 * sign of a broken protocol (deciding from a frame's header, before its
 * payload arrives); read in place, a message is a view of the memory the
 * socket read into. Against `ws`: records cross both ways, fragments and
 * pings from `ws` are understood, close frames are exchanged with their
 * codes, and a client that breaks the protocol is closed with 1002 or 1009.
 *
 *   npx tsx test/ws-protocol.test.ts
 */
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import net from 'node:net';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import WebSocket, { WebSocketServer } from 'ws';
import type { Link, StreamTransportPlugin } from '../core/types.ts';
import { acceptFor, checkUpgradeAnswer } from '../core/ws-handshake.ts';
import { OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, WsFrameReader } from '../core/ws-reader.ts';
import wsPlugin from '../plugins/transport-ws.ts';
import { testContext } from './helpers/context.ts';
import { patterned, probeLink } from './helpers/link-probe.ts';
import { withTimeout } from './helpers/timeout.ts';

/** One frame as a peer would write it: `key` masks it (a client's), null leaves it plain. */
function frame(opcode: number, payload: Buffer, opts: { fin?: boolean; key?: Buffer | null; rsv?: number; len64?: boolean } = {}): Buffer {
  const key = opts.key ?? null;
  const length = payload.length;
  const ext = opts.len64 || length > 0xffff ? 8 : length > 125 ? 2 : 0;
  const head = Buffer.alloc(2 + ext + (key ? 4 : 0));
  head[0] = (opts.fin === false ? 0 : 0x80) | (opts.rsv ?? 0) | opcode;
  head[1] = (key ? 0x80 : 0) | (ext === 8 ? 127 : ext === 2 ? 126 : length);
  if (ext === 2) head.writeUInt16BE(length, 2);
  if (ext === 8) head.writeBigUInt64BE(BigInt(length), 2);
  const body = Buffer.from(payload);
  if (key) {
    key.copy(head, 2 + ext);
    for (let i = 0; i < body.length; i++) body[i]! ^= key[i & 3]!;
  }
  return Buffer.concat([head, body]);
}

interface Seen {
  messages: Buffer[];
  controls: [number, Buffer][];
  violations: [number, string][];
  heads: string[];
}

function reader(masked: boolean, head = false): { r: WsFrameReader; seen: Seen } {
  const seen: Seen = { messages: [], controls: [], violations: [], heads: [] };
  const r = new WsFrameReader(
    masked,
    {
      head: (h) => (seen.heads.push(h), true),
      message: (m) => void seen.messages.push(Buffer.from(m)),
      control: (op, p) => void seen.controls.push([op, Buffer.from(p)]),
      violation: (code, why) => void seen.violations.push([code, why]),
    },
    head,
  );
  return { r, seen };
}

const key = () => randomBytes(4);

test('the same messages however the bytes are split: whole, byte by byte, and read in place', () => {
  const sizes = [0, 1, 125, 126, 1000, 65535];
  const payloads = sizes.map((n, i) => patterned(i, n));
  for (const masked of [false, true]) {
    const wire = Buffer.concat(payloads.map((p, i) => frame(OP_BINARY, p, { key: masked ? key() : null, len64: i === 3 })));
    const whole = reader(masked);
    whole.r.push(wire);
    const bytewise = reader(masked);
    for (let i = 0; i < wire.length; i++) bytewise.r.push(wire.subarray(i, i + 1));
    const inPlace = reader(masked);
    for (let at = 0; at < wire.length; ) {
      // Reads of uneven sizes, as a socket's may be.
      const into = inPlace.r.readBuffer();
      const n = Math.min(into.length, wire.length - at, 1 + ((at * 7919) % 40_000));
      wire.copy(into, 0, at, at + n);
      at += n;
      inPlace.r.wrote(n);
    }
    for (const { seen } of [whole, bytewise, inPlace]) {
      assert.equal(seen.violations, [], `masked ${masked}: no violation`);
      assert.is(seen.messages.length, payloads.length, `masked ${masked}: every message`);
      seen.messages.forEach((m, i) => assert.ok(m.equals(payloads[i]!), `masked ${masked}: message ${i} (${sizes[i]} bytes)`));
    }
  }
});

test('read in place, a message is a view of the memory the socket read into', () => {
  const delivered: Buffer[] = [];
  const r = new WsFrameReader(false, { message: (m) => void delivered.push(m), control: () => {}, violation: () => assert.unreachable('no violation') });
  const payload = patterned(9, 40_000);
  const wire = frame(OP_BINARY, payload);
  const into = r.readBuffer();
  assert.ok(into.length >= wire.length, 'room for the whole frame');
  wire.copy(into);
  r.wrote(wire.length);
  assert.is(delivered.length, 1);
  assert.ok(delivered[0]!.equals(payload));
  assert.is(delivered[0]!.buffer, into.buffer, 'no copy: the same memory');
});

test('fragments are put together around control frames; text is dropped; pings and close frames come through', () => {
  const { r, seen } = reader(true);
  const k = key;
  r.push(
    Buffer.concat([
      frame(OP_TEXT, Buffer.from('hello'), { key: k() }),
      frame(OP_BINARY, patterned(1, 100), { fin: false, key: k() }),
      frame(OP_PING, Buffer.from('p1'), { key: k() }),
      frame(0, patterned(2, 70_000 - 69_900), { fin: false, key: k() }),
      frame(0, patterned(3, 5), { key: k() }),
      frame(OP_TEXT, Buffer.from('a'), { fin: false, key: k() }),
      frame(0, Buffer.from('b'), { key: k() }),
      frame(OP_PONG, Buffer.alloc(0), { key: k() }),
      frame(OP_CLOSE, Buffer.from([0x03, 0xe8]), { key: k() }),
    ]),
  );
  assert.equal(seen.violations, []);
  assert.is(seen.messages.length, 1, 'one binary message; both text messages dropped');
  assert.ok(seen.messages[0]!.equals(Buffer.concat([patterned(1, 100), patterned(2, 100), patterned(3, 5)])));
  assert.equal(
    seen.controls.map(([op, p]) => [op, p.toString('hex')]),
    [
      [OP_PING, Buffer.from('p1').toString('hex')],
      [OP_PONG, ''],
      [OP_CLOSE, '03e8'],
    ],
  );
});

test('a broken protocol stops the reader with the close code to answer, decided from the header alone', () => {
  const k = key;
  const cases: [string, boolean, Buffer, number][] = [
    ['reserved bits', true, frame(OP_BINARY, Buffer.from('x'), { key: k(), rsv: 0x40 }), 1002],
    ['an unknown opcode', true, frame(3, Buffer.from('x'), { key: k() }), 1002],
    ['an unknown control opcode', true, frame(0xb, Buffer.alloc(0), { key: k() }), 1002],
    ['an unmasked frame to a server', true, frame(OP_BINARY, Buffer.from('x')), 1002],
    ['a masked frame to a client', false, frame(OP_BINARY, Buffer.from('x'), { key: k() }), 1002],
    ['a fragmented ping', true, frame(OP_PING, Buffer.from('x'), { key: k(), fin: false }), 1002],
    ['a ping of 126 bytes', true, frame(OP_PING, Buffer.alloc(126), { key: k() }), 1002],
    ['a continuation outside a message', true, frame(0, Buffer.from('x'), { key: k() }), 1002],
    [
      'a new message inside one',
      true,
      Buffer.concat([frame(OP_BINARY, Buffer.from('x'), { key: k(), fin: false }), frame(OP_BINARY, Buffer.from('y'), { key: k() })]),
      1002,
    ],
    ['a frame of 65536 bytes', true, frame(OP_BINARY, Buffer.alloc(65536), { key: k() }).subarray(0, 14), 1009],
    ['a frame claiming 2^40 bytes', false, Buffer.from([0x82, 127, 0, 0, 1, 0, 0, 0, 0, 0]), 1009],
    [
      'fragments of more than 65535 bytes',
      true,
      Buffer.concat([frame(OP_BINARY, Buffer.alloc(40_000), { key: k(), fin: false }), frame(0, Buffer.alloc(30_000), { key: k() })]),
      1009,
    ],
  ];
  for (const [what, masked, wire, code] of cases) {
    const { r, seen } = reader(masked);
    r.push(wire);
    r.push(frame(OP_BINARY, Buffer.from('after'), { key: masked ? k() : null }));
    assert.is(seen.violations.length, 1, what);
    assert.is(seen.violations[0]![0], code, `${what}: close code`);
    assert.equal(seen.messages, [], `${what}: nothing delivered`);
    assert.ok(r.stopped, `${what}: stopped`);
  }
});

test('a client reads the answer head, then holds the frames behind it until release()', () => {
  const { r, seen } = reader(false, true);
  const head = `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor('dGhlIHNhbXBsZSBub25jZQ==')}`;
  r.push(Buffer.concat([Buffer.from(`${head}\r\n\r\n`, 'latin1'), frame(OP_BINARY, Buffer.from('one')).subarray(0, 3)]));
  assert.equal(seen.heads, [head]);
  assert.ok(checkUpgradeAnswer(head, 'dGhlIHNhbXBsZSBub25jZQ==').ok, 'the RFC 6455 example key checks out');
  assert.not.ok(checkUpgradeAnswer(head, 'AAAAAAAAAAAAAAAAAAAAAA==').ok, 'another key does not');
  r.hold();
  r.push(Buffer.concat([frame(OP_BINARY, Buffer.from('one')).subarray(3), frame(OP_BINARY, Buffer.from('two'))]));
  assert.equal(seen.messages, [], 'nothing while held');
  r.release();
  assert.equal(seen.messages.map(String), ['one', 'two']);
  const other = reader(false, true);
  other.r.push(Buffer.alloc(20_000, 0x41));
  assert.is(other.seen.violations[0]?.[0], 1002, 'an answer head that never ends is refused');
});

// --- against the ws library ---

type WsOptions = Parameters<typeof wsPlugin.create>[0];

function makeWs(options: Partial<WsOptions> = {}): StreamTransportPlugin {
  return wsPlugin.create(options as WsOptions, testContext()) as StreamTransportPlugin;
}

function waitFor<T>(p: Promise<T>, what: string, ms = 5_000): Promise<T> {
  return withTimeout(p, ms, what);
}

test('our client against a ws server: records both ways, its fragments and pings, its close code', async () => {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, path: '/dshield' });
  await waitFor(new Promise((r) => wss.once('listening', r)), 'the ws server');
  const peer = waitFor(new Promise<WebSocket>((r) => wss.once('connection', r)), 'the ws server to accept');
  const t = makeWs();
  try {
    const link = await waitFor(t.dial(`127.0.0.1:${(wss.address() as net.AddressInfo).port}`), 'dial');
    const a = probeLink(link);
    const ws = await peer;
    const got: Buffer[] = [];
    ws.on('message', (m: Buffer, binary: boolean) => binary && got.push(Buffer.from(m)));
    const pongs: Buffer[] = [];
    ws.on('pong', (p: Buffer) => pongs.push(Buffer.from(p)));

    const sent = [patterned(1, 10), patterned(2, 65535), patterned(3, 0)];
    link.send(sent[0]!);
    const room = Buffer.alloc(8 + 65535);
    sent[1]!.copy(room, 8);
    link.sendInPlace!(room.subarray(8));
    link.sendBatch([sent[2]!]);
    await a.until(() => got.length === 3, 5_000, 'three messages at the ws server');
    got.forEach((m, i) => assert.ok(m.equals(sent[i]!), `message ${i} unmasked as sent`));

    ws.send(patterned(4, 300), { binary: true, fin: false });
    ws.ping(Buffer.from('are you there'));
    ws.send(patterned(5, 200), { binary: true, fin: true });
    ws.send('text is dropped');
    ws.send(patterned(6, 70), { binary: true });
    await a.until(() => a.records.length === 2 && pongs.length === 1, 5_000, 'two records and a pong');
    assert.ok(a.records[0]!.equals(Buffer.concat([patterned(4, 300), patterned(5, 200)])), 'the fragments as one record');
    assert.ok(a.records[1]!.equals(patterned(6, 70)));
    assert.is(pongs[0]!.toString(), 'are you there');

    const closed = waitFor(new Promise<number>((r) => ws.once('close', (code: number) => r(code))), 'the ws server to see the close');
    ws.close(4001, 'bye');
    assert.is(await closed, 4001, 'our link answered with the same code');
    await a.until(() => a.closes.length === 1, 5_000, 'our link closed');
    assert.is(a.closes[0], undefined, 'a clean close');
  } finally {
    for (const c of wss.clients) c.terminate();
    await new Promise((r) => wss.close(r));
    await t.close?.();
  }
});

async function ourServer(): Promise<{ port: number; nextLink(): Promise<Link>; close(): Promise<void> }> {
  const t = makeWs();
  const links: Link[] = [];
  const listener = await t.listen('127.0.0.1:0', (l) => links.push(l));
  return {
    port: Number(listener.address.slice(listener.address.lastIndexOf(':') + 1)),
    nextLink: () =>
      waitFor(
        new Promise<Link>((resolve) => {
          const tick = setInterval(() => {
            const l = links.shift();
            if (l) {
              clearInterval(tick);
              resolve(l);
            }
          }, 5);
        }),
        'a server link',
      ),
    async close() {
      await listener.close();
      await t.close?.();
    },
  };
}

/** A `ws` client connected to our server, and our side's link. */
async function wsClientOf(server: { port: number; nextLink(): Promise<Link> }): Promise<{ ws: WebSocket; b: ReturnType<typeof probeLink> }> {
  const ws = new WebSocket(`ws://127.0.0.1:${server.port}/dshield`);
  ws.on('error', () => {});
  try {
    await waitFor(new Promise((r) => ws.once('open', r)), 'the ws client to open');
    return { ws, b: probeLink(await server.nextLink()) };
  } catch (err) {
    ws.terminate();
    throw err;
  }
}

/** Our link closes: the `ws` client sees 1000 and our side one clean close. */
async function closeOurSide(ws: WebSocket, b: ReturnType<typeof probeLink>): Promise<void> {
  const closed = waitFor(new Promise<number>((r) => ws.once('close', (code: number) => r(code))), 'the ws client to see the close');
  b.link.close();
  assert.is(await closed, 1000);
  await b.until(() => b.closes.length === 1, 5_000, 'our link closed');
  assert.is(b.closes[0], undefined, 'a clean close');
}

test('a ws client against our server: its masked records, fragments and text; our close with 1000', async () => {
  const server = await ourServer();
  const { ws, b } = await wsClientOf(server).catch(async (err: unknown) => {
    await server.close();
    throw err;
  });
  try {
    const got: Buffer[] = [];
    ws.on('message', (m: Buffer) => got.push(Buffer.from(m)));
    ws.send(patterned(1, 65535));
    ws.send('dropped');
    ws.send(patterned(2, 10), { fin: false });
    ws.send(patterned(3, 10), { fin: true });
    await b.until(() => b.records.length === 2, 5_000, 'two records at our server');
    assert.ok(b.records[0]!.equals(patterned(1, 65535)), 'unmasked');
    assert.ok(b.records[1]!.equals(Buffer.concat([patterned(2, 10), patterned(3, 10)])));

    b.link.send(patterned(4, 1234));
    await b.until(() => got.length === 1, 5_000, 'our record at the ws client');
    assert.ok(got[0]!.equals(patterned(4, 1234)), 'server frames are not masked');

    await closeOurSide(ws, b);
  } finally {
    ws.terminate();
    await server.close();
  }
});

/** The descriptor of this process that holds the TCP connection from 127.0.0.1:`local` to `remote` (-1: none). */
function descriptorOf(local: number, remote: number): number {
  const port = (hex: string) => parseInt(hex.split(':')[1]!, 16);
  let inode = '';
  for (const line of readFileSync('/proc/self/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length > 9 && port(f[1]!) === local && port(f[2]!) === remote) inode = f[9]!;
  }
  if (inode === '') return -1;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === `socket:[${inode}]`) return Number(fd);
    } catch {
      // closed meanwhile
    }
  }
  return -1;
}

test('a server link reads in place once it carries bulk frames: its connection moves to a socket of its own, and works on', async () => {
  const server = await ourServer();
  const { ws, b } = await wsClientOf(server).catch(async (err: unknown) => {
    await server.close();
    throw err;
  });
  try {
    const clientPort = (ws as unknown as { _socket: net.Socket })._socket.localPort!;
    const accepted = descriptorOf(server.port, clientPort);
    assert.ok(accepted >= 0, 'the accepted connection is found');

    // Small messages: the accepted socket keeps reading them.
    for (let i = 0; i < 500; i++) ws.send(patterned(i, 1 + ((i * 37) % 700)));
    await b.until(() => b.records.length === 500, 5_000, 'the small records');
    assert.is(descriptorOf(server.port, clientPort), accepted, 'small messages: the same socket');

    // Bulk: full reads in a row; the connection moves to the socket made to read in place.
    const bulk = Array.from({ length: 64 }, (_, i) => patterned(1000 + i, 65535));
    for (const m of bulk) ws.send(m);
    await b.until(() => b.records.length === 500 + bulk.length, 10_000, 'the bulk records');
    for (let i = 0; i < 500; i++) assert.ok(b.records[i]!.equals(patterned(i, 1 + ((i * 37) % 700))), `small record ${i}`);
    for (let i = 0; i < bulk.length; i++) assert.ok(b.records[500 + i]!.equals(bulk[i]!), `bulk record ${i}, in order`);
    const moved = descriptorOf(server.port, clientPort);
    assert.ok(moved >= 0 && moved !== accepted, `the connection moved to another descriptor (${accepted} -> ${moved})`);

    // It works on, both ways, and closes as before.
    const got: Buffer[] = [];
    ws.on('message', (m: Buffer) => got.push(Buffer.from(m)));
    ws.send(patterned(7, 100));
    b.link.send(patterned(8, 1234));
    await b.until(() => got.length === 1 && b.records.length === 501 + bulk.length, 5_000, 'a record each way after the move');
    assert.ok(got[0]!.equals(patterned(8, 1234)));
    await closeOurSide(ws, b);
    assert.is(descriptorOf(server.port, clientPort), -1, 'no descriptor left for the connection');
  } finally {
    ws.terminate();
    await server.close();
  }
});

test('a client that breaks the protocol is closed with 1002, or 1009 for a message too long', async () => {
  const server = await ourServer();
  try {
    // A ws client whose message is one byte too long for a record.
    const big = new WebSocket(`ws://127.0.0.1:${server.port}/dshield`);
    big.on('error', () => {});
    await waitFor(new Promise((r) => big.once('open', r)), 'open');
    const b = probeLink(await server.nextLink());
    const code = waitFor(new Promise<number>((r) => big.once('close', (c: number) => r(c))), 'the close after a long message');
    big.send(Buffer.alloc(65536));
    assert.is(await code, 1009);
    await b.until(() => b.closes.length === 1, 5_000, 'our link closed');
    assert.match(String(b.closes[0]), /more than 65535 bytes/);

    // A raw client whose frame is not masked.
    const sock = net.connect(server.port, '127.0.0.1');
    sock.on('error', () => {});
    let answer = Buffer.alloc(0);
    sock.on('data', (d) => (answer = Buffer.concat([answer, d])));
    const ended = waitFor(new Promise((r) => sock.once('close', r)), 'the server to close the raw client');
    sock.write('GET /dshield HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n');
    const c = probeLink(await server.nextLink());
    sock.write(frame(OP_BINARY, Buffer.from('unmasked')));
    await ended;
    const headEnd = answer.indexOf('\r\n\r\n') + 4;
    assert.match(answer.subarray(0, headEnd).toString('latin1'), /^HTTP\/1\.1 101 /);
    assert.equal([...answer.subarray(headEnd)], [0x88, 2, 0x03, 0xea], 'one close frame with 1002, unmasked');
    await c.until(() => c.closes.length === 1, 5_000, 'the raw client link closed');
    assert.equal(c.records, [], 'nothing delivered');
  } finally {
    await server.close();
  }
});

test.run();
