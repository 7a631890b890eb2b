/**
 * core/reopen-socket.ts and reopenPooled (core/pooled-reads.ts) over real
 * loopback sockets: an accepted socket reopened at accept reads through
 * `onread` (here the pool's buffers), in order, including what the peer
 * sent before the reopening; it writes and half-closes as the accepted
 * one would; it starts paused; the accepted socket is closed without
 * ending the connection; no descriptor is left behind; and a socket that
 * has already read is left alone. BulkReads tells when a socket's chunks
 * show bulk data, never for TLS.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { attachPooledSink, pooledReadStats, reopenPooled } from '../core/pooled-reads.ts';
import { BulkReads, reopenWithOnread } from '../core/reopen-socket.ts';
import { sha256Of } from './helpers/collector.ts';
import { withTimeout } from './helpers/timeout.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const openFds = (): number => readdirSync('/proc/self/fd').length;

/** A server made with pauseOnConnect (as the SOCKS5 inbound is) that hands each accepted socket to `onAccept`. */
async function serve(onAccept: (s: Socket) => void): Promise<{ port: number; server: Server }> {
  const server = createServer({ allowHalfOpen: true, pauseOnConnect: true }, onAccept);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as AddressInfo).port, server };
}

function dial(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect({ host: '127.0.0.1', port, allowHalfOpen: true });
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

const closed = (s: Socket): Promise<void> => new Promise((r) => (s.closed ? r() : s.once('close', () => r())));

test('an upload into a reopened socket arrives whole, through the pool, with what came before the reopening first', async () => {
  const early = Buffer.from('sent before the server reopened the socket;');
  const payload = randomBytes(16 * 1024 * 1024);
  const accepted: Socket[] = [];
  const reopened: Socket[] = [];
  let accept!: () => void;
  const acceptedNow = new Promise<void>((r) => (accept = r));
  const { port, server } = await serve((s) => {
    accepted.push(s);
    accept();
  });
  const client = await dial(port);
  try {
    client.write(early);
    await withTimeout(acceptedNow, 5_000, 'the connection was not accepted');
    await sleep(50); // the early bytes now wait in the kernel, unread
    const socket = reopenPooled(accepted[0]!, { allowHalfOpen: true });
    reopened.push(socket);
    assert.is.not(socket, accepted[0], 'reopened, not the accepted socket');
    assert.ok(accepted[0]!.destroyed, 'the accepted socket is closed');
    const before = pooledReadStats().made;
    const got: Buffer[] = [];
    let views = 0;
    attachPooledSink(socket, (data, release) => {
      got.push(Buffer.from(data));
      if (release) {
        views++;
        release();
      }
      return true;
    });
    client.end(payload);
    await withTimeout(new Promise<void>((r) => (socket.readableEnded ? r() : socket.once('end', () => r()))), 10_000, 'the upload did not end');
    assert.is(sha256Of(got), sha256Of([early, payload]), 'every byte, the early ones first, in order');
    assert.ok(views > 50, `bulk reads were views of pool buffers (${views})`);
    assert.ok(pooledReadStats().made - before < views / 4, 'and the buffers were reused');

    // The other direction and the half-close work as on the accepted socket.
    const answer = new Promise<string>((resolve) => {
      let text = '';
      client.on('data', (d: Buffer) => (text += d.toString()));
      client.once('end', () => resolve(text));
    });
    socket.end('received');
    assert.is(await withTimeout(answer, 5_000, 'the answer did not come'), 'received');
  } finally {
    client.destroy();
    for (const s of reopened) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  }
});

test('a reopened socket starts paused, with nothing lost, and reopening leaves no descriptor behind', async () => {
  const fdsBefore = openFds();
  const sockets: Socket[] = [];
  /** What each reopened socket read, through its `onread` (which takes the place of 'data' events). */
  const seen: string[] = [];
  const { port, server } = await serve((s) => {
    const i = sockets.length;
    const buffer = Buffer.alloc(4096);
    seen[i] = '';
    const r = reopenWithOnread(s, { buffer, callback: (n) => ((seen[i] += buffer.toString('latin1', 0, n)), true) });
    if (r) sockets.push(r);
    else s.destroy();
  });
  const clients: Socket[] = [];
  try {
    for (let i = 0; i < 20; i++) clients.push(await dial(port));
    const deadline = Date.now() + 5_000;
    while (sockets.length < clients.length && Date.now() < deadline) await sleep(10);
    assert.is(sockets.length, clients.length, 'every accepted socket was reopened');

    // Paused: nothing is read until resume().
    clients[0]!.write('hello');
    await sleep(100);
    assert.is(seen[0], '', 'nothing read while paused');
    sockets[0]!.resume();
    const until = Date.now() + 5_000;
    while (seen[0] !== 'hello' && Date.now() < until) await sleep(10);
    assert.is(seen[0], 'hello', 'read through onread once resumed');
  } finally {
    for (const c of clients) c.destroy();
    await Promise.all(sockets.map((s) => (s.destroy(), closed(s))));
    await new Promise<void>((r) => server.close(() => r()));
  }
  // Each reopened socket held one descriptor (the accepted one's was closed); all are gone now.
  assert.is(openFds(), fdsBefore, 'no descriptor left open');
});

test('a socket that has already read is not reopened: null, and it works on as before', async () => {
  let accepted!: Socket;
  let accept!: () => void;
  const acceptedNow = new Promise<void>((r) => (accept = r));
  const { port, server } = await serve((s) => {
    accepted = s;
    accept();
  });
  const client = await dial(port);
  try {
    await withTimeout(acceptedNow, 5_000, 'the connection was not accepted');
    client.write('already here');
    accepted.resume();
    accepted.pause();
    const deadline = Date.now() + 5_000;
    while (accepted.readableLength === 0 && Date.now() < deadline) {
      accepted.read(0); // have Node read what arrived into the paused socket's buffer
      await sleep(10);
    }
    assert.ok(accepted.readableLength > 0, 'data waits in the accepted socket');
    assert.is(reopenWithOnread(accepted, { buffer: Buffer.alloc(64), callback: () => true }), null);
    assert.not.ok(accepted.destroyed, 'left open');
    assert.is((accepted.read() as Buffer).toString(), 'already here', 'and its data is still there');
  } finally {
    client.destroy();
    accepted?.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  }
});

test('BulkReads: four large chunks in a row make a socket a bulk one; a short one starts over; TLS never; a failure waits for empty buffers', () => {
  const socket = (fields: Partial<Socket> & { encrypted?: boolean } = {}) => ({ writableLength: 0, readableLength: 0, ...fields }) as Socket;
  const plain = new BulkReads(socket());
  assert.equal([65536, 40000, 65536].map((n) => plain.due(n)), [false, false, false]);
  assert.is(plain.due(1000), false, 'a short chunk');
  assert.equal([65536, 65536, 32768, 65536].map((n) => plain.due(n)), [false, false, false, true], 'the fourth large chunk in a row');

  const tls = new BulkReads(socket({ encrypted: true }));
  assert.ok([...Array(10)].every(() => !tls.due(65536)), 'a TLS socket is never reopened');

  const busy = new BulkReads(socket());
  for (let i = 0; i < 3; i++) busy.due(65536);
  assert.ok(busy.due(65536));
  busy.failed(socket({ writableLength: 100 }));
  assert.equal([0, 1, 2, 3].map(() => busy.due(65536)), [false, false, false, true], 'tried again after more bulk chunks');
  busy.failed(socket());
  assert.ok([...Array(10)].every(() => !busy.due(65536)), 'with empty buffers, the failure is for good');
});

test.run();
