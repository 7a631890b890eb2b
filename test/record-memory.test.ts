/**
 * core/record-memory.ts: record memory is read into again only once its
 * reader left it, every record from it was vouched for and every counted
 * view was released; anything less leaves it to the garbage collector.
 * Then end to end over a real loopback socket: a mux reading through the
 * tcp transport's RecordReader, spliced into a slow consumer, reuses its
 * memory and delivers every byte, and without the releases it does not reuse.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { connect, createServer, type AddressInfo, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import {
  countView,
  recordDelivered,
  recordMemoryStats,
  releaseView,
  retireRecordMemory,
  takeRecordMemory,
  viewRelease,
  vouchRecord,
} from '../core/record-memory.ts';
import { Mux } from '../core/mux.ts';
import { EventBus } from '../core/events.ts';
import { splice } from '../core/splice.ts';
import { RecordReader } from '../plugins/transport-tcp.ts';
import { memoryLogger } from './helpers/mux-pair.ts';
import { Collector, sha256Of } from './helpers/collector.ts';
import { withTimeout } from './helpers/timeout.ts';

const SIZE = 65541;

/** Takes memory, delivers one record from it with two views, and returns the handles. */
function oneRecord(): { memory: Buffer; record: Buffer; views: Buffer[] } {
  const memory = takeRecordMemory(SIZE);
  const record = memory.subarray(2, 40_002);
  recordDelivered(record);
  const views = [record.subarray(10, 20_010), record.subarray(20_010, 40_000)];
  for (const v of views) countView(v);
  return { memory, record, views };
}

test('memory comes back only when retired, vouched for and every view released, in any order', () => {
  for (const order of [['retire', 'vouch', 'v0', 'v1'], ['v1', 'vouch', 'v0', 'retire'], ['vouch', 'v0', 'retire', 'v1']]) {
    const { memory, record, views } = oneRecord();
    const free = recordMemoryStats().free;
    for (let i = 0; i < order.length; i++) {
      assert.is(recordMemoryStats().free, free, `not free before ${order[i]} (${order.join(', ')})`);
      const step = order[i];
      if (step === 'retire') retireRecordMemory(memory);
      else if (step === 'vouch') vouchRecord(record.subarray(1));
      else releaseView(views[Number(step[1])]!);
    }
    assert.is(recordMemoryStats().free, free + 1, `free after ${order.join(', ')}`);
    assert.is(takeRecordMemory(SIZE), memory, 'the next taker gets it');
    retireRecordMemory(memory); // leave the pool as it was: nothing delivered, so it is free again
  }
});

test('a record nobody vouches for, or a view nobody releases, keeps its memory out of the pool', () => {
  const a = oneRecord();
  const free = recordMemoryStats().free;
  retireRecordMemory(a.memory);
  for (const v of a.views) releaseView(v);
  assert.is(recordMemoryStats().free, free, 'not vouched: not reused');

  const b = oneRecord();
  retireRecordMemory(b.memory);
  vouchRecord(b.record);
  releaseView(b.views[0]!);
  releaseView(b.views[0]!);
  releaseView(b.views[0]!.subarray(5)); // a slice of a view is not the view
  assert.is(recordMemoryStats().free, free, 'one view still out (released twice counts once; a slice does not count)');
  assert.is(viewRelease(b.views[0]!), undefined, 'a released view has no release left');
  viewRelease(b.views[1]!)!();
  assert.is(recordMemoryStats().free, free + 1, 'the last view released: reused');
  retireRecordMemory(takeRecordMemory(SIZE));
});

test('memory of other sizes and plain buffers are left alone', () => {
  const plain = Buffer.alloc(20_000);
  countView(plain);
  assert.is(viewRelease(plain), undefined);
  vouchRecord(plain);
  retireRecordMemory(plain);
  const free = recordMemoryStats().free;
  const other = takeRecordMemory(4096); // another size empties the pool
  assert.is(recordMemoryStats().free, 0);
  retireRecordMemory(other);
  assert.is(recordMemoryStats().free, 1, 'the pool now holds the new size');
  assert.ok(free >= 0);
  retireRecordMemory(takeRecordMemory(SIZE));
});


/** Length-prefixed records, as the tcp transport frames them. */
function framed(payload: Buffer): Buffer {
  const out = Buffer.allocUnsafe(2 + payload.length);
  out.writeUInt16BE(payload.length, 0);
  payload.copy(out, 2);
  return out;
}

/**
 * A download through two muxes over a loopback socket, the client reading
 * through RecordReader's in-place memory as a dialed tcp link does.
 * `consume` takes the client's stream. Returns the record memory made.
 */
async function download(payload: Buffer, consume: (stream: Duplex) => Promise<Buffer[]>): Promise<{ made: number; got: Buffer[] }> {
  const events = new EventBus();
  let serverMux: Mux | undefined;
  const accepted: Socket[] = [];
  const listener = createServer((sock) => {
    accepted.push(sock);
    const reader = new RecordReader((rec) => serverMux!.receive(rec));
    sock.on('data', (chunk: Buffer) => reader.push(chunk));
    sock.on('error', () => {});
    serverMux = new Mux({
      side: 'server',
      maxPayload: 65518,
      events,
      client: 'test',
      log: memoryLogger(),
      send: (p) => sock.write(framed(p)),
      onOpen(req) {
        const stream = req.accept();
        stream.on('error', () => {}); // torn down with the muxes at the end
        stream.end(payload);
      },
    });
    sock.on('drain', () => serverMux!.drain());
  });
  await new Promise<void>((r) => listener.listen(0, '127.0.0.1', r));
  let clientMux: Mux | undefined;
  const reader = new RecordReader((rec) => clientMux!.receive(rec));
  const sock = connect({
    host: '127.0.0.1',
    port: (listener.address() as AddressInfo).port,
    onread: {
      buffer: () => reader.readBuffer(),
      callback: (n: number) => {
        reader.wrote(n);
        return true;
      },
    },
  });
  sock.on('error', () => {});
  clientMux = new Mux({ side: 'client', maxPayload: 65518, events, log: memoryLogger(), send: (p) => sock.write(framed(p)) });
  sock.on('drain', () => clientMux!.drain());
  const before = recordMemoryStats().made;
  try {
    await withTimeout(new Promise<void>((r) => sock.once('connect', () => r())), 5_000, 'the loopback connect');
    const stream = await withTimeout(clientMux.openStream({ host: 'example.test', port: 80 }), 5_000, 'the stream open');
    stream.on('error', () => {}); // torn down with the muxes at the end
    const got = await withTimeout(consume(stream), 15_000, 'the download');
    return { made: recordMemoryStats().made - before, got };
  } finally {
    clientMux.close();
    serverMux?.close();
    sock.destroy();
    for (const s of accepted) s.destroy();
    await new Promise<void>((r) => listener.close(() => r()));
  }
}

test('a spliced download reuses its record memory and delivers every byte', async () => {
  const payload = randomBytes(16 * 1024 * 1024);
  const { made, got } = await download(payload, async (stream) => {
    const out = new Collector();
    const finished = new Promise<void>((r) => out.once('finish', () => r()));
    void splice(stream, out);
    await finished;
    return out.chunks;
  });
  assert.is(sha256Of(got), sha256Of([payload]), 'every byte, in order');
  // 16 MiB is ~260 records; without reuse each takes memory of its own (the control below).
  assert.ok(made < 64, `record memory was reused: ${made} made for ~260 records`);
});

test('control: a reader that never releases its views gets fresh memory for every record', async () => {
  const payload = randomBytes(8 * 1024 * 1024);
  const { made, got } = await download(
    payload,
    (stream) =>
      new Promise((resolve) => {
        const chunks: Buffer[] = [];
        stream.on('data', (c: Buffer) => chunks.push(c)); // keeps the views themselves
        stream.on('end', () => resolve(chunks));
      }),
  );
  assert.is(sha256Of(got), sha256Of([payload]), 'every byte, views intact');
  assert.ok(made > 100, `no reuse without releases: ${made} made for ~130 records`);
});

test.run();
