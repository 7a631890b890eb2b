/**
 * The frames the ws transport writes, in place (sendInPlace) and copied
 * (send). What must hold on the wire, read by a TCP relay between
 * client and server: every client frame is masked (RFC 6455 section 5.3)
 * with a fresh random key, or with the zero key under `zeroMask`; no server
 * frame is masked; every frame is one final binary frame with the shortest
 * length encoding; and frames from sendInPlace and from send interleave in
 * the order they were sent.
 *
 *   npx tsx test/ws-frames.test.ts
 */
import net from 'node:net';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { Link, StreamTransportPlugin } from '../core/types.ts';
import { maskInJavaScript, maskInPlace, writeMaskKey } from '../core/ws-mask.ts';
import wsPlugin from '../plugins/transport-ws.ts';
import { testContext } from './helpers/context.ts';
import { patterned, probeLink } from './helpers/link-probe.ts';
import { withTimeout } from './helpers/timeout.ts';

type WsOptions = Parameters<typeof wsPlugin.create>[0];

interface Frame {
  fin: boolean;
  opcode: number;
  /** The 4-byte key, or null when the frame is not masked. */
  key: Buffer | null;
  /** The payload as it crossed the wire (still masked). */
  wire: Buffer;
  /** The payload unmasked. */
  payload: Buffer;
  /** Bytes of the length field after the first two header bytes (0, 2 or 8). */
  extendedLength: number;
}

/** Parses the frames after the HTTP head of one direction's bytes. */
function parseFrames(stream: Buffer): Frame[] {
  const headEnd = stream.indexOf('\r\n\r\n');
  assert.ok(headEnd > 0, 'an HTTP head before the frames');
  const frames: Frame[] = [];
  let at = headEnd + 4;
  while (at < stream.length) {
    const fin = (stream[at]! & 0x80) !== 0;
    const opcode = stream[at]! & 0x0f;
    const masked = (stream[at + 1]! & 0x80) !== 0;
    let length = stream[at + 1]! & 0x7f;
    at += 2;
    let extendedLength = 0;
    if (length === 126) {
      length = stream.readUInt16BE(at);
      extendedLength = 2;
    } else if (length === 127) {
      length = Number(stream.readBigUInt64BE(at));
      extendedLength = 8;
    }
    at += extendedLength;
    const key = masked ? Buffer.from(stream.subarray(at, at + 4)) : null;
    if (masked) at += 4;
    assert.ok(at + length <= stream.length, 'a whole frame');
    const wire = Buffer.from(stream.subarray(at, at + length));
    const payload = Buffer.from(wire);
    if (key) for (let i = 0; i < payload.length; i++) payload[i]! ^= key[i & 3]!;
    frames.push({ fin, opcode, key, wire, payload, extendedLength });
    at += length;
  }
  return frames;
}

/** A TCP relay that keeps every byte of both directions. */
async function startTap(backendPort: number) {
  const up: Buffer[] = [];
  const down: Buffer[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const backend = net.connect(backendPort, '127.0.0.1');
    for (const s of [client, backend]) {
      sockets.add(s);
      s.on('error', () => {});
    }
    client.on('data', (c) => void (up.push(c), backend.write(c)));
    backend.on('data', (c) => void (down.push(c), client.write(c)));
    client.on('close', () => backend.destroy());
    backend.on('close', () => client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    upstream: () => Buffer.concat(up),
    downstream: () => Buffer.concat(down),
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** Records of the sizes where a frame's length encoding changes, each in memory with the link's headroom. */
const SIZES = [0, 1, 125, 126, 1400, 65535];

function sendInPlace(link: Link, record: Buffer): void {
  const head = link.headroom!;
  const memory = Buffer.alloc(head + record.length, 0xee);
  record.copy(memory, head);
  link.sendInPlace!(memory.subarray(head));
}

async function exchange(options: Partial<WsOptions>) {
  const t = wsPlugin.create(options as WsOptions, testContext()) as StreamTransportPlugin;
  let serverLink: Link | undefined;
  const listener = await t.listen('127.0.0.1:0', (l) => void (serverLink = l));
  const tap = await startTap(Number(listener.address.slice(listener.address.lastIndexOf(':') + 1)));
  try {
    const client = await withTimeout(t.dial(`127.0.0.1:${tap.port}`), 5_000, 'dial');
    const a = probeLink(client);
    const deadline = Date.now() + 5_000;
    while (!serverLink && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.ok(serverLink, 'the server has its link');
    const b = probeLink(serverLink);
    // Each side: every size by sendInPlace, each followed by one record through send().
    for (const side of [client, serverLink]) {
      SIZES.forEach((n, i) => {
        sendInPlace(side, patterned(i, n));
        side.send(patterned(100 + i, 7));
      });
    }
    const count = SIZES.length * 2;
    await b.until(() => b.records.length >= count, 5_000, 'records at the server');
    await a.until(() => a.records.length >= count, 5_000, 'records at the client');
    for (const [probe, what] of [[a, 'at the client'], [b, 'at the server']] as const) {
      SIZES.forEach((n, i) => {
        assert.ok(probe.records[2 * i]!.equals(patterned(i, n)), `in-place record ${i} ${what}`);
        assert.ok(probe.records[2 * i + 1]!.equals(patterned(100 + i, 7)), `sent record ${i} ${what}`);
      });
    }
    client.close();
    await a.until(() => a.closes.length === 1 && b.closes.length === 1, 5_000, 'close');
    return { up: parseFrames(tap.upstream()), down: parseFrames(tap.downstream()) };
  } finally {
    await tap.close();
    await listener.close();
    await t.close?.();
  }
}

/** The data frames (binary), without the close frames. */
const dataFrames = (frames: Frame[]) => frames.filter((f) => f.opcode === 2);

function assertShape(frames: Frame[], what: string): void {
  assert.is(frames.length, SIZES.length * 2, `${what}: one frame per record`);
  SIZES.forEach((n, i) => {
    const f = frames[2 * i]!;
    assert.ok(f.fin, `${what}: frame ${i} is final`);
    assert.ok(f.payload.equals(patterned(i, n)), `${what}: frame ${i} carries its record`);
    assert.is(f.extendedLength, n > 125 ? 2 : 0, `${what}: frame ${i} (${n} bytes) has the shortest length field`);
  });
}

test('client frames are masked with a fresh random key each; server frames are not masked', async () => {
  const { up, down } = await exchange({});
  const fromClient = dataFrames(up);
  const fromServer = dataFrames(down);
  assertShape(fromClient, 'client -> server');
  assertShape(fromServer, 'server -> client');
  for (const f of fromClient) assert.ok(f.key !== null, 'every client frame is masked');
  for (const f of fromServer) assert.is(f.key, null, 'no server frame is masked');
  const inPlace = SIZES.map((_, i) => fromClient[2 * i]!);
  const keys = new Set(inPlace.map((f) => f.key!.toString('hex')));
  assert.is(keys.size, inPlace.length, 'a different key for every frame');
  assert.not.ok(keys.has('00000000'), 'no zero key');
  const big = inPlace[inPlace.length - 1]!;
  assert.not.ok(big.wire.equals(big.payload), 'the payload on the wire is masked');
});

test('zeroMask: client frames carry the all-zero key and the payload as it is', async () => {
  const { up } = await exchange({ zeroMask: true });
  const fromClient = dataFrames(up);
  assertShape(fromClient, 'client -> server');
  SIZES.forEach((_, i) => {
    const f = fromClient[2 * i]!;
    assert.ok(f.key !== null && f.key.equals(Buffer.alloc(4)), `frame ${i}: the zero key`);
    assert.ok(f.wire.equals(f.payload), `frame ${i}: unchanged on the wire`);
  });
});

test('masking XORs with the key repeated, at any length and alignment, natively and in JavaScript; twice gives the data back', () => {
  const k = Buffer.alloc(4);
  writeMaskKey(k);
  const ways: [string, (data: Buffer) => void][] = [
    ['maskInPlace', (data) => maskInPlace(data, k)],
    ['maskInJavaScript', (data) => maskInJavaScript(data, k)],
  ];
  for (const [name, mask] of ways) {
    for (const length of [0, 1, 3, 4, 15, 16, 17, 47, 48, 49, 1000, 65535]) {
      for (const offset of [0, 1, 4, 7]) {
        const memory = Buffer.alloc(offset + length);
        const data = memory.subarray(offset);
        for (let i = 0; i < length; i++) data[i] = (i * 13 + 5) & 0xff;
        const original = Buffer.from(data);
        mask(data);
        for (let i = 0; i < length; i++) {
          if (data[i] !== (original[i]! ^ k[i & 3]!)) assert.unreachable(`${name}, length ${length}, offset ${offset}: byte ${i}`);
        }
        mask(data);
        assert.ok(data.equals(original), `${name}, length ${length}, offset ${offset}: unmasked again`);
      }
    }
  }
});

test.run();
