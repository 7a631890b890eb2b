/**
 * core/pooled-reads.ts over real loopback sockets: a bulk transfer arrives
 * whole through reused buffers, a view not yet released is never read into
 * again, short reads are copies (an idle socket holds no pool buffer), data
 * that comes before the sink is buffered with reading stopped, a sink can stop
 * reading, and splice hands the buffers back through its writes. Before
 * a sink is attached the socket reads like any other (the outbound contract).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { attachPooledSink, connectPooled, pooledReadStats } from '../core/pooled-reads.ts';
import { splice } from '../core/splice.ts';
import { Collector, sha256Of } from './helpers/collector.ts';
import { withTimeout } from './helpers/timeout.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A server that runs `onConnection` for each socket; closed by the returned function. */
async function serve(onConnection: (s: Socket) => void): Promise<{ port: number; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    onConnection(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as AddressInfo).port,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(() => r()));
    },
  };
}

function dial(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connectPooled({ host: '127.0.0.1', port });
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

const ended = (s: Socket): Promise<void> => new Promise((r) => (s.readableEnded ? r() : s.once('end', () => r())));

test('a bulk transfer arrives whole through reused buffers; a view not released is never read into again', async () => {
  const payload = randomBytes(16 * 1024 * 1024);
  const srv = await serve((s) => s.end(payload));
  try {
    const before = pooledReadStats().made;
    const socket = await dial(srv.port);
    const got: Buffer[] = [];
    const kept: Array<{ view: Buffer; copy: Buffer }> = [];
    let views = 0;
    attachPooledSink(socket, (data, release) => {
      got.push(Buffer.from(data));
      if (release) {
        views++;
        // The first three views stay out, as data a consumer still holds; the rest come back a microtask later, as the mux copies them.
        if (kept.length < 3) kept.push({ view: data, copy: Buffer.from(data) });
        else queueMicrotask(release);
      }
      return true;
    });
    await withTimeout(ended(socket), 10_000, 'the transfer did not end');
    socket.destroy();
    assert.is(sha256Of(got), sha256Of(payload), 'every byte, in order');
    assert.ok(views > 100, `most reads were views of pool buffers (${views})`);
    for (const k of kept) assert.ok(k.view.equals(k.copy), 'a view not released still holds its data');
    const made = pooledReadStats().made - before;
    assert.ok(made < views / 4, `buffers were reused: ${made} made for ${views} views`);
  } finally {
    await srv.close();
  }
});

test('short reads are copies, and an idle socket takes no pool buffer', async () => {
  const srv = await serve(async (s) => {
    for (let i = 0; i < 5; i++) {
      s.write(`message ${i};`);
      await sleep(20);
    }
    s.end();
  });
  try {
    const before = pooledReadStats().made;
    const socket = await dial(srv.port);
    const got: string[] = [];
    const releases: Array<(() => void) | null> = [];
    attachPooledSink(socket, (data, release) => {
      got.push(data.toString());
      releases.push(release);
      return true;
    });
    await withTimeout(ended(socket), 5_000, 'the messages did not end');
    socket.destroy();
    assert.is(got.join(''), 'message 0;message 1;message 2;message 3;message 4;');
    assert.ok(releases.every((r) => r === null), 'each short read was handed over as a copy');
    assert.is(pooledReadStats().made, before, 'no pool buffer was taken');
  } finally {
    await srv.close();
  }
});

test('before a sink, a pooled socket is an ordinary Duplex: \'data\' events carry every byte', async () => {
  const payload = randomBytes(4 * 1024 * 1024);
  const srv = await serve((s) => s.end(payload));
  try {
    const socket = await dial(srv.port);
    const got: Buffer[] = [];
    socket.on('data', (chunk: Buffer) => got.push(Buffer.from(chunk)));
    await withTimeout(ended(socket), 5_000, 'the transfer did not end');
    socket.destroy();
    assert.is(sha256Of(got), sha256Of(payload));
  } finally {
    await srv.close();
  }
});

test('data that comes before the sink is buffered with reading stopped, and reaches the sink first', async () => {
  const payload = randomBytes(1024 * 1024);
  const srv = await serve((s) => s.end(payload));
  try {
    const socket = await dial(srv.port);
    await sleep(150);
    assert.ok(socket.bytesRead <= 64 * 1024, `one read at most before the sink (${socket.bytesRead})`);
    const got: Buffer[] = [];
    attachPooledSink(socket, (data, release) => {
      got.push(Buffer.from(data));
      release?.();
      return true;
    });
    await withTimeout(ended(socket), 5_000, 'the transfer did not end');
    socket.destroy();
    assert.is(sha256Of(got), sha256Of(payload));
  } finally {
    await srv.close();
  }
});

test('a sink that returns false stops reading until resume(); a release twice gives a buffer back once', async () => {
  const payload = randomBytes(4 * 1024 * 1024);
  const srv = await serve((s) => s.end(payload));
  try {
    const socket = await dial(srv.port);
    const got: Buffer[] = [];
    let stopped = false;
    let twice: (() => void) | null = null;
    attachPooledSink(socket, (data, release) => {
      got.push(Buffer.from(data));
      if (release && !twice) {
        twice = release;
        return true;
      }
      release?.();
      if (!stopped && socket.bytesRead >= 256 * 1024) {
        stopped = true;
        return false;
      }
      return true;
    });
    await sleep(200);
    const held = socket.bytesRead;
    await sleep(150);
    assert.ok(stopped, 'the sink stopped the socket');
    assert.is(socket.bytesRead, held, 'no read while stopped');
    assert.ok(held < payload.length, 'the transfer was not over when it stopped');
    const free = pooledReadStats().free;
    twice!();
    twice!();
    assert.is(pooledReadStats().free, Math.min(free + 1, 16), 'the buffer went back once');
    socket.resume();
    await withTimeout(ended(socket), 5_000, 'the transfer did not go on after resume()');
    socket.destroy();
    assert.is(sha256Of(got), sha256Of(payload));
  } finally {
    await srv.close();
  }
});

test('splice writes a pooled socket\'s reads and hands the buffers back once written', async () => {
  const payload = randomBytes(8 * 1024 * 1024);
  const srv = await serve((s) => s.end(payload));
  try {
    const before = pooledReadStats().made;
    const socket = await dial(srv.port);
    const out = new Collector();
    const finished = new Promise<void>((r) => out.once('finish', () => r()));
    void splice(socket, out);
    await withTimeout(finished, 10_000, 'the spliced transfer did not finish');
    socket.destroy();
    out.destroy();
    assert.is(sha256Of(out.chunks), sha256Of(payload), 'every byte through splice');
    assert.ok(pooledReadStats().made - before < 32, `buffers came back through the writes (${pooledReadStats().made - before} made for 8 MiB)`);
    assert.ok(pooledReadStats().free > 0, 'free buffers wait for the next read');
  } finally {
    await srv.close();
  }
});

test.run();
