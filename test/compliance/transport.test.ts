/**
 * Compliance suite for transport plugins: every plugins/transport-*.ts is
 * found on disk and run through the checks of its kind's contract
 * (core/types.ts), over 127.0.0.1 (and ::1 when the machine has it). Stream
 * transports get the Link and StreamTransportPlugin checks (order, no loss,
 * backpressure, close); datagram transports the DatagramEndpoint checks
 * (bind, send and receive up to maxDatagramSize, the sender's address,
 * backpressure, close, a port in use). tcp gets extra checks of its framing
 * (garbage in, split chunks, zero-copy delivery).
 *
 *   npx tsx test/compliance/transport.test.ts
 */
import net from 'node:net';
import dgram from 'node:dgram';
import { readdirSync } from 'node:fs';
import { suite, test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkPluginDefinition } from '../../core/define.ts';
import { isDshieldError } from '../../core/errors.ts';
import type {
  DatagramEndpoint,
  DatagramTransportPlugin,
  Link,
  PluginContext,
  StreamTransportPlugin,
  TransportListener,
  TransportPlugin,
} from '../../core/types.ts';
import { testContext } from '../helpers/context.ts';
import { patterned, probeLink, sendAll, sleep, type LinkProbe } from '../helpers/link-probe.ts';
import { withTimeout } from '../helpers/timeout.ts';

const PLUGIN_DIR = new URL('../../plugins/', import.meta.url);
const MAX = 65535;

interface Pair {
  listener: TransportListener;
  client: Link;
  server: Link;
  cleanup(): Promise<void>;
}

/** Listens on host:0, dials it, and returns both ends (neither started). */
async function connectPair(t: StreamTransportPlugin, host = '127.0.0.1'): Promise<Pair> {
  let resolveServer!: (l: Link) => void;
  const serverLink = new Promise<Link>((r) => (resolveServer = r));
  const listener = await t.listen(`${host}:0`, (l) => resolveServer(l));
  let client: Link | undefined;
  try {
    client = await withTimeout(t.dial(listener.address), 5_000, 'dial');
    const server = await withTimeout(serverLink, 5_000, 'the server side of a link');
    return {
      listener,
      client,
      server,
      async cleanup() {
        client!.destroy();
        server.destroy();
        await listener.close();
      },
    };
  } catch (err) {
    client?.destroy();
    await listener.close();
    throw err;
  }
}

/** A port on 127.0.0.1 that nothing listens on (bound, then released). */
async function closedPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address() as net.AddressInfo;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function hasIPv6Loopback(): Promise<boolean> {
  const s = net.createServer();
  return new Promise((resolve) => {
    s.once('error', () => resolve(false));
    s.listen(0, '::1', () => s.close(() => resolve(true)));
  });
}

function assertRecords(got: Buffer[], sizes: number[], what: string): void {
  assert.is(got.length, sizes.length, `${what}: record count`);
  for (let i = 0; i < sizes.length; i++) {
    if (!got[i]!.equals(patterned(i, sizes[i]!))) assert.unreachable(`${what}: record ${i} (${sizes[i]} bytes) differs`);
  }
}

/** Both close handlers have run once; a little later still exactly once. */
/** Every record of `sizes` reached the other end, both ways, and neither link closed. */
async function assertBothWays(client: LinkProbe, server: LinkProbe, sizes: number[]): Promise<void> {
  await server.until(() => server.records.length >= sizes.length, 5_000, 'records at the server');
  await client.until(() => client.records.length >= sizes.length, 5_000, 'records at the client');
  assertRecords(server.records, sizes, 'client -> server');
  assertRecords(client.records, sizes, 'server -> client');
  assert.is(client.closes.length + server.closes.length, 0, 'no close');
}

async function assertClosedOnce(a: LinkProbe, b: LinkProbe, what: string): Promise<void> {
  await a.until(() => a.closes.length > 0 && b.closes.length > 0, 8_000, `${what}: close on both ends`);
  await sleep(100);
  assert.is(a.closes.length, 1, `${what}: close called once on one end`);
  assert.is(b.closes.length, 1, `${what}: close called once on the other end`);
}

type Make<T> = (ctx: PluginContext) => T | Promise<T>;

function streamSuite(name: string, make: Make<StreamTransportPlugin>): void {
  const s = suite(`transport ${name}`);
  const controller = new AbortController();
  const ctx = testContext({ signal: controller.signal });
  let t: StreamTransportPlugin;

  s.before(async () => {
    t = await make(ctx);
  });
  s.after(async () => {
    await t.close?.();
    controller.abort();
  });

  s('is a stream transport with the contract constants', () => {
    assert.is(t.name, name);
    assert.is(t.type, 'stream');
  });

  s('listens on 127.0.0.1:0 and reports the bound address; dial connects', async () => {
    const p = await connectPair(t);
    try {
      const m = /^127\.0\.0\.1:(\d+)$/.exec(p.listener.address);
      assert.ok(m, `bound address ${p.listener.address}`);
      assert.ok(Number(m![1]) > 0, 'a real port, not 0');
      for (const l of [p.client, p.server]) {
        assert.is(l.type, 'stream');
        assert.is(l.maxRecordSize, MAX);
        assert.is(l.bufferedAmount, 0);
      }
      assert.is(p.client.remoteAddress, p.listener.address, 'client sees the server address');
      assert.match(p.server.remoteAddress, /^127\.0\.0\.1:\d+$/);
      assert.is.not(p.server.remoteAddress, p.listener.address);
    } finally {
      await p.cleanup();
    }
  });

  s('IPv6: listens on [::1]:0 and dials it', async () => {
    if (!(await hasIPv6Loopback())) {
      console.log(`  (skipped for ${name}: this machine has no ::1)`);
      return;
    }
    const p = await connectPair(t, '[::1]');
    try {
      assert.match(p.listener.address, /^\[::1\]:\d+$/);
      assert.is(p.client.remoteAddress, p.listener.address);
      assert.match(p.server.remoteAddress, /^\[::1\]:\d+$/);
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      a.link.send(patterned(0, 100));
      await b.until(() => b.records.length === 1, 5_000, 'a record over IPv6');
      assertRecords(b.records, [100], 'IPv6');
    } finally {
      await p.cleanup();
    }
  });

  s('records of 0, 1, 1000, 16384 and 65535 bytes arrive intact and in order, both ways at once', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      const sizes = [0, 1, 1000, 16384, MAX, 0, MAX, 16384, 1, 0];
      const records = sizes.map((n, i) => patterned(i, n));
      await Promise.all([sendAll(a, records), sendAll(b, records)]);
      await assertBothWays(a, b, sizes);
    } finally {
      await p.cleanup();
    }
  });

  s('memory is the caller\'s again when bufferedAmount is 0 after send/sendInPlace: reusing it then corrupts nothing', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      const head = a.link.headroom ?? 0;
      assert.is(a.link.sendInPlace === undefined, a.link.headroom === undefined, 'headroom and sendInPlace come together');
      const sizes = Array.from({ length: 600 }, (_, i) => [1, 1400, 16384, MAX][i % 4]!);
      let memory = Buffer.alloc(head + MAX);
      let reused = 0;
      for (let i = 0; i < sizes.length; i++) {
        const record = memory.subarray(head, head + sizes[i]!);
        patterned(i, sizes[i]!).copy(record);
        const inPlace = a.link.sendInPlace !== undefined && i % 2 === 0;
        if (inPlace) a.link.sendInPlace!(record);
        else a.link.send(record);
        if (a.link.bufferedAmount === 0) {
          memory.fill(0xa5); // the link said it holds nothing: scribble over what it was given
          reused++;
        } else {
          memory = Buffer.alloc(head + MAX);
        }
        if (i % 50 === 49) await sleep(1);
      }
      await b.until(() => b.records.length >= sizes.length, 10_000, 'records');
      assertRecords(b.records, sizes, 'records whose memory was reused');
      assert.ok(reused > 0, 'some sends were handed to the OS at once');
    } finally {
      await p.cleanup();
    }
  });

  s('sendInPlace from both ends, mixed with send and sendBatch: every size arrives intact and in order', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      if (a.link.sendInPlace === undefined || b.link.sendInPlace === undefined) {
        assert.is(a.link.sendInPlace === undefined && b.link.sendInPlace === undefined, true, 'both ends or neither offer sendInPlace');
        return;
      }
      assert.ok((a.link.headroom ?? 0) > 0 && (b.link.headroom ?? 0) > 0, 'headroom comes with sendInPlace');
      // 125/126 and 65535: where length encodings of stream framings change.
      const sizes = [0, 1, 125, 126, 127, 1400, 16384, MAX, 3, MAX, 0, 126];
      const sendVaried = (probe: typeof a) => {
        const head = probe.link.headroom!;
        sizes.forEach((n, i) => {
          const record = patterned(i, n);
          if (i % 3 === 0) {
            // Memory of its own each time, with junk in the headroom: the link owns those bytes.
            const memory = Buffer.alloc(head + n, 0xee);
            record.copy(memory, head);
            probe.link.sendInPlace!(memory.subarray(head));
          } else if (i % 3 === 1) {
            probe.link.send(record);
          } else {
            probe.link.sendBatch([record]);
          }
        });
      };
      sendVaried(a);
      sendVaried(b);
      await assertBothWays(a, b, sizes);
    } finally {
      await p.cleanup();
    }
  });

  s('a maximum-size record on an idle link does not ask the caller to wait', async () => {
    // false stops a mux until drain; saying it after every 64 KiB record
    // (above a socket's 16 KiB mark) stalled each flush for a tick.
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      assert.ok(a.link.send(patterned(1, MAX)), 'send');
      if (a.link.sendInPlace) {
        const head = a.link.headroom ?? 0;
        const memory = Buffer.alloc(head + MAX);
        patterned(2, MAX).copy(memory, head);
        assert.ok(a.link.sendInPlace(memory.subarray(head)), 'sendInPlace');
      }
      assert.ok(a.link.sendBatch([patterned(3, MAX)]), 'sendBatch');
      await b.until(() => b.records.length >= (a.link.sendInPlace ? 3 : 2), 5_000, 'the records');
    } finally {
      await p.cleanup();
    }
  });

  s('5000 small records arrive in order', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      const sizes = Array.from({ length: 5000 }, (_, i) => (i * 13) % 97);
      await sendAll(a, sizes.map((n, i) => patterned(i, n)));
      await b.until(() => b.records.length >= sizes.length, 10_000, '5000 records');
      assertRecords(b.records, sizes, 'small records');
    } finally {
      await p.cleanup();
    }
  });

  s('sendBatch delivers every record of a batch, in order', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      const sizes = [5, 0, 300, 16384, MAX, 16384, 16384, 16384, 16384, 1, 2, 3, ...Array(200).fill(40)];
      const records = sizes.map((n, i) => patterned(i, n));
      // Small batch (one buffer), large batch (corked), and an empty one.
      a.link.sendBatch(records.slice(0, 4));
      a.link.sendBatch([]);
      a.link.sendBatch(records.slice(4, 12));
      a.link.sendBatch(records.slice(12));
      await b.until(() => b.records.length >= sizes.length, 5_000, 'batched records');
      assertRecords(b.records, sizes, 'sendBatch');
    } finally {
      await p.cleanup();
    }
  });

  s('nothing is delivered before start(); what arrived early is delivered after, in order', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const sizes = [10, 0, 2000, 20];
      for (let i = 0; i < sizes.length; i++) a.link.send(patterned(i, sizes[i]!));
      await sleep(150); // the records are at the server's door by now
      const b = probeLink(p.server, { start: false });
      b.start();
      assert.is(b.records.length, 0, 'start() itself delivers nothing synchronously');
      await b.until(() => b.records.length >= sizes.length, 5_000, 'early records after start');
      assertRecords(b.records, sizes, 'early records');
    } finally {
      await p.cleanup();
    }
  });

  s('backpressure: send() returns false while the peer does not read, then drain arrives and nothing is lost', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server, { start: false }); // not reading yet
      let sent = 0;
      let ok = true;
      while (ok) {
        ok = a.link.send(patterned(sent, 16384));
        sent++;
        if (sent > 8192) assert.unreachable('send() never returned false after 128 MiB');
      }
      assert.ok(a.link.bufferedAmount > 0, 'bytes are queued when send() says stop');
      const drained = a.nextDrain(15_000);
      b.start();
      await drained;
      assert.ok(a.drains >= 1, 'drain delivered');
      await b.until(() => b.records.length >= sent, 15_000, `all ${sent} records after the drain`);
      assertRecords(b.records, Array(sent).fill(16384), 'backpressured records');
    } finally {
      await p.cleanup();
    }
  });

  s('close() from the client flushes queued records, then both ends see close exactly once', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server, { start: false }); // not reading: the client's queue fills
      const sizes: number[] = [];
      while (a.link.bufferedAmount === 0 && sizes.length < 8192) {
        a.link.send(patterned(sizes.length, 16384));
        sizes.push(16384);
      }
      assert.ok(a.link.bufferedAmount > 0, 'records are queued in the link, not yet with the OS');
      a.link.close();
      b.start();
      a.link.close(); // idempotent
      assert.is(a.link.send(Buffer.alloc(10)), false, 'send after close() returns false');
      await assertClosedOnce(a, b, 'client close');
      assertRecords(b.records, sizes, 'records sent before close()');
      assert.is(b.closes[0], undefined, 'an orderly close carries no error');
      assert.not.throws(() => b.link.send(Buffer.alloc(10)), 'send on a closed link does not throw');
    } finally {
      await p.cleanup();
    }
  });

  s('close() from the server: both ends see close exactly once', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      b.link.send(patterned(0, 77));
      b.link.close();
      await assertClosedOnce(a, b, 'server close');
      assertRecords(a.records, [77], 'record sent before close()');
    } finally {
      await p.cleanup();
    }
  });

  s('destroy() from either side: both ends see close exactly once', async () => {
    for (const side of ['client', 'server'] as const) {
      const p = await connectPair(t);
      try {
        const a = probeLink(p.client);
        const b = probeLink(p.server);
        (side === 'client' ? a : b).link.destroy();
        (side === 'client' ? a : b).link.destroy();
        await assertClosedOnce(a, b, `${side} destroy`);
      } finally {
        await p.cleanup();
      }
    }
  });

  s('a link closed by the peer before start() reports close once start() is called', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      a.link.destroy();
      await a.until(() => a.closes.length === 1, 5_000, 'client close');
      await sleep(100);
      const b = probeLink(p.server);
      await b.until(() => b.closes.length === 1, 5_000, 'close delivered after a late start()');
      await sleep(50);
      assert.is(b.closes.length, 1);
    } finally {
      await p.cleanup();
    }
  });

  s('a record larger than maxRecordSize is refused with a RangeError and nothing is sent', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      assert.throws(() => a.link.send(Buffer.alloc(MAX + 1)), (e: unknown) => e instanceof RangeError);
      assert.throws(
        () => a.link.sendBatch([patterned(0, 10), Buffer.alloc(MAX + 1)]),
        (e: unknown) => e instanceof RangeError,
      );
      if (a.link.sendInPlace) {
        const head = a.link.headroom ?? 0;
        assert.throws(() => a.link.sendInPlace!(Buffer.alloc(head + MAX + 1).subarray(head)), (e: unknown) => e instanceof RangeError);
      }
      a.link.send(patterned(0, 3));
      await b.until(() => b.records.length >= 1, 5_000, 'the record after the refused ones');
      await sleep(50);
      assertRecords(b.records, [3], 'only the valid record arrived');
      assert.is(b.closes.length, 0, 'the link is still up');
    } finally {
      await p.cleanup();
    }
  });

  s('closing the listener refuses new links and leaves existing ones working', async () => {
    const p = await connectPair(t);
    try {
      const a = probeLink(p.client);
      const b = probeLink(p.server);
      await withTimeout(p.listener.close(), 2_000, 'listener.close()');
      await p.listener.close(); // idempotent
      const err = await withTimeout(
        t.dial(p.listener.address).then(
          (l) => (l.destroy(), null),
          (e: unknown) => e,
        ),
        5_000,
        'dial after listener.close()',
      );
      assert.ok(isDshieldError(err, 'DSHIELD_ERR_UNREACHABLE'), `got ${String(err)}`);
      a.link.send(patterned(0, 500));
      b.link.send(patterned(0, 600));
      await b.until(() => b.records.length === 1, 5_000, 'a record after listener.close()');
      await a.until(() => a.records.length === 1, 5_000, 'a reply after listener.close()');
      assert.is(a.closes.length + b.closes.length, 0);
    } finally {
      await p.cleanup();
    }
  });

  s('listen on a port in use rejects with DSHIELD_ERR_LISTEN', async () => {
    const first = await t.listen('127.0.0.1:0', (l) => l.destroy());
    try {
      const err = await t.listen(first.address, (l) => l.destroy()).then(
        (l) => (void l.close(), null),
        (e: unknown) => e,
      );
      assert.ok(isDshieldError(err, 'DSHIELD_ERR_LISTEN'), `got ${String(err)}`);
      assert.match((err as Error).message, `cannot listen on ${first.address}: address already in use`);
    } finally {
      await first.close();
    }
  });

  s('a malformed listen address rejects with DSHIELD_ERR_CONFIG', async () => {
    for (const bad of ['127.0.0.1', '::1:80', '127.0.0.1:99999', 'localhost:http']) {
      const err = await t.listen(bad, (l) => l.destroy()).then(
        (l) => (void l.close(), null),
        (e: unknown) => e,
      );
      assert.ok(isDshieldError(err, 'DSHIELD_ERR_CONFIG'), `${bad}: got ${String(err)}`);
    }
  });

  s('dial to a closed port rejects with DSHIELD_ERR_UNREACHABLE (reason refused)', async () => {
    const port = await closedPort();
    const err = await withTimeout(
      t.dial(`127.0.0.1:${port}`).then(
        (l) => (l.destroy(), null),
        (e: unknown) => e,
      ),
      5_000,
      'dial to a closed port',
    );
    assert.ok(isDshieldError(err, 'DSHIELD_ERR_UNREACHABLE'), `got ${String(err)}`);
    assert.is((err as { detail?: { reason?: string } }).detail?.reason, 'refused');
    assert.match((err as Error).message, 'connection refused');
  });

  s('dial with an aborted signal rejects without connecting', async () => {
    const c = new AbortController();
    c.abort();
    const err = await t.dial('127.0.0.1:1', c.signal).then(
      (l) => (l.destroy(), null),
      (e: unknown) => e,
    );
    assert.instance(err, Error);
    assert.is((err as Error).name, 'AbortError');
  });

  s('aborting ctx.signal closes the listener', async () => {
    const c = new AbortController();
    const own = await make(testContext({ signal: c.signal }));
    const l = await own.listen('127.0.0.1:0', (link) => link.destroy());
    c.abort();
    await sleep(20);
    const err = await withTimeout(
      t.dial(l.address).then(
        (link) => (link.destroy(), null),
        (e: unknown) => e,
      ),
      5_000,
      'dial after shutdown',
    );
    assert.ok(isDshieldError(err, 'DSHIELD_ERR_UNREACHABLE'), `got ${String(err)}`);
  });

  s.run();
}

// ---------------------------------------------------------------------------
// datagram transports

interface EndpointProbe {
  readonly endpoint: DatagramEndpoint;
  /** Copies of what arrived, with the sender's address. */
  readonly got: { data: Buffer; from: string }[];
  readonly closes: (Error | undefined)[];
  readonly drains: number;
  start(): void;
  until(cond: () => boolean, ms: number, what: string): Promise<void>;
}

function probeEndpoint(endpoint: DatagramEndpoint, opts: { start?: boolean } = {}): EndpointProbe {
  const got: { data: Buffer; from: string }[] = [];
  const closes: (Error | undefined)[] = [];
  let drains = 0;
  const probe: EndpointProbe = {
    endpoint,
    got,
    closes,
    get drains() {
      return drains;
    },
    start: () =>
      endpoint.start({
        datagram: (data, from) => void got.push({ data: Buffer.from(data), from }),
        drain: () => void drains++,
        close: (err) => void closes.push(err),
      }),
    until(cond, ms, what) {
      if (cond()) return Promise.resolve();
      let timer: NodeJS.Timeout | undefined;
      return withTimeout(
        new Promise<void>((resolve) => {
          timer = setInterval(() => cond() && resolve(), 5);
        }),
        ms,
        what,
      ).finally(() => clearInterval(timer));
    },
  };
  if (opts.start !== false) probe.start();
  return probe;
}

/** Datagrams may arrive in any order: match them by content. */
function assertDatagrams(got: { data: Buffer; from: string }[], sizes: number[], from: string, what: string): void {
  assert.is(got.length, sizes.length, `${what}: datagram count`);
  const left = sizes.map((n, i) => patterned(i, n));
  for (const g of got) {
    assert.is(g.from, from, `${what}: the sender's address`);
    const at = left.findIndex((d) => d.equals(g.data));
    if (at < 0) assert.unreachable(`${what}: a datagram of ${g.data.length} bytes that was not sent (or arrived twice)`);
    left.splice(at, 1);
  }
}

function datagramSuite(name: string, make: Make<DatagramTransportPlugin>): void {
  const s = suite(`transport ${name} (datagram)`);
  const controller = new AbortController();
  const ctx = testContext({ signal: controller.signal });
  let t: DatagramTransportPlugin;
  const open = new Set<DatagramEndpoint>();
  const bind = async (address = '127.0.0.1:0'): Promise<DatagramEndpoint> => {
    const e = await t.bind(address);
    open.add(e);
    return e;
  };

  s.before(async () => {
    t = await make(ctx);
  });
  s.after.each(() => {
    for (const e of open) e.close();
    open.clear();
  });
  s.after(async () => {
    await t.close?.();
    controller.abort();
  });

  s('is a datagram transport with bind()', () => {
    assert.is(t.name, name);
    assert.is(t.type, 'datagram');
    assert.type(t.bind, 'function');
  });

  s('binds 127.0.0.1:0, reports the bound address and a sane maxDatagramSize', async () => {
    const e = await bind();
    const m = /^127\.0\.0\.1:(\d+)$/.exec(e.localAddress);
    assert.ok(m, `bound address ${e.localAddress}`);
    assert.ok(Number(m![1]) > 0, 'a real port, not 0');
    assert.ok(e.maxDatagramSize >= 1200 && e.maxDatagramSize <= 65507, `maxDatagramSize ${e.maxDatagramSize}`);
  });

  s('datagrams of 0, 1, 1000 and maxDatagramSize bytes arrive intact both ways, with the sender as `from`', async () => {
    const a = probeEndpoint(await bind());
    const b = probeEndpoint(await bind());
    const max = a.endpoint.maxDatagramSize;
    const sizes = [0, 1, 1000, max, 1, max];
    for (let i = 0; i < sizes.length; i++) {
      assert.ok(a.endpoint.send(patterned(i, sizes[i]!), b.endpoint.localAddress), 'send accepted');
      b.endpoint.send(patterned(i, sizes[i]!), a.endpoint.localAddress);
    }
    await b.until(() => b.got.length >= sizes.length, 5_000, 'datagrams at b');
    await a.until(() => a.got.length >= sizes.length, 5_000, 'datagrams at a');
    assertDatagrams(b.got, sizes, a.endpoint.localAddress, 'a -> b');
    assertDatagrams(a.got, sizes, b.endpoint.localAddress, 'b -> a');
    // `from` is an address send() takes back.
    b.endpoint.send(patterned(99, 5), b.got[0]!.from);
    await a.until(() => a.got.length > sizes.length, 5_000, 'an answer to `from`');
  });

  s('a datagram from any plain UDP socket is delivered with that socket\'s address', async () => {
    const e = probeEndpoint(await bind());
    const sock = dgram.createSocket('udp4');
    try {
      await new Promise<void>((r) => sock.bind(0, '127.0.0.1', () => r()));
      sock.send(Buffer.from('hello'), Number(e.endpoint.localAddress.split(':')[1]), '127.0.0.1');
      await e.until(() => e.got.length === 1, 5_000, 'a datagram from a plain socket');
      assert.is(e.got[0]!.data.toString(), 'hello');
      assert.is(e.got[0]!.from, `127.0.0.1:${sock.address().port}`);
    } finally {
      sock.close();
    }
  });

  s('IPv6: binds [::1]:0 and exchanges datagrams', async () => {
    if (!(await hasIPv6Loopback())) {
      console.log(`  (skipped for ${name}: this machine has no ::1)`);
      return;
    }
    const a = probeEndpoint(await bind('[::1]:0'));
    const b = probeEndpoint(await bind('[::1]:0'));
    assert.match(a.endpoint.localAddress, /^\[::1\]:\d+$/);
    a.endpoint.send(patterned(0, 100), b.endpoint.localAddress);
    await b.until(() => b.got.length === 1, 5_000, 'a datagram over IPv6');
    assertDatagrams(b.got, [100], a.endpoint.localAddress, 'IPv6');
  });

  s('above maxDatagramSize, or to a malformed destination, send() throws RangeError and sends nothing', async () => {
    const a = probeEndpoint(await bind());
    const b = probeEndpoint(await bind());
    const to = b.endpoint.localAddress;
    assert.throws(() => a.endpoint.send(Buffer.alloc(a.endpoint.maxDatagramSize + 1), to), (e: unknown) => e instanceof RangeError);
    for (const bad of ['example.com:53', '127.0.0.1', '127.0.0.1:0', '::1:53', '[::1]', 'nonsense']) {
      assert.throws(() => a.endpoint.send(Buffer.alloc(1), bad), (e: unknown) => e instanceof RangeError, bad);
    }
    a.endpoint.send(patterned(0, 3), to);
    await b.until(() => b.got.length >= 1, 5_000, 'the valid datagram');
    await sleep(50);
    assertDatagrams(b.got, [3], a.endpoint.localAddress, 'only the valid datagram');
  });

  s('nothing is delivered before start(), nor by start() itself; early datagrams follow', async () => {
    const a = probeEndpoint(await bind());
    const b = probeEndpoint(await bind(), { start: false });
    for (let i = 0; i < 3; i++) a.endpoint.send(patterned(i, 10 + i), b.endpoint.localAddress);
    await sleep(100);
    b.start();
    assert.is(b.got.length, 0, 'start() delivers nothing synchronously');
    await b.until(() => b.got.length >= 3, 5_000, 'early datagrams after start');
    assertDatagrams(b.got, [10, 11, 12], a.endpoint.localAddress, 'early datagrams');
  });

  s('backpressure: send() hands each datagram to the OS at once, or returns false at a bound and drain follows', async () => {
    const a = probeEndpoint(await bind());
    const b = probeEndpoint(await bind());
    let sent = 0;
    while (a.endpoint.send(patterned(sent, 1), b.endpoint.localAddress)) {
      sent++;
      if (sent === 100_000) {
        // Nothing backed up (a kernel that takes every datagram, as loopback does): then nothing may be held either.
        assert.is(a.endpoint.pending, 0, 'an endpoint whose send() never says false holds no datagram');
        return;
      }
    }
    await a.until(() => a.drains >= 1, 5_000, 'drain after false');
    assert.ok(a.endpoint.send(patterned(0, 1), b.endpoint.localAddress), 'send works again after drain');
  });

  s('close(): close handler once, without error; send() after close is false; the port is free again', async () => {
    const b = probeEndpoint(await bind());
    const a = probeEndpoint(await bind());
    a.endpoint.send(patterned(0, 50), b.endpoint.localAddress); // in flight when close() comes: still goes out
    a.endpoint.close();
    a.endpoint.close();
    assert.is(a.endpoint.send(Buffer.alloc(1), b.endpoint.localAddress), false, 'send after close');
    await a.until(() => a.closes.length === 1, 5_000, 'the close handler');
    await b.until(() => b.got.length === 1, 5_000, 'the datagram sent just before close()');
    await sleep(50);
    assert.is(a.closes.length, 1, 'close called once');
    assert.is(a.closes[0], undefined, 'no error');
    const again = await bind(a.endpoint.localAddress);
    assert.is(again.localAddress, a.endpoint.localAddress, 'the same port binds again');
  });

  s('bind on a port in use rejects with DSHIELD_ERR_LISTEN', async () => {
    const first = await bind();
    const err = await t.bind(first.localAddress).then(
      (e) => (e.close(), null),
      (e: unknown) => e,
    );
    assert.ok(isDshieldError(err, 'DSHIELD_ERR_LISTEN'), `got ${String(err)}`);
    assert.match((err as Error).message, `cannot listen on ${first.localAddress}: address already in use`);
  });

  s('a malformed bind address rejects with DSHIELD_ERR_CONFIG', async () => {
    for (const bad of ['127.0.0.1', '::1:80', '127.0.0.1:99999', 'localhost:http']) {
      const err = await t.bind(bad).then(
        (e) => (e.close(), null),
        (e: unknown) => e,
      );
      assert.ok(isDshieldError(err, 'DSHIELD_ERR_CONFIG'), `${bad}: got ${String(err)}`);
    }
  });

  s('aborting ctx.signal closes its endpoints', async () => {
    const c = new AbortController();
    const own = await make(testContext({ signal: c.signal }));
    const e = probeEndpoint(await own.bind('127.0.0.1:0'));
    c.abort();
    await e.until(() => e.closes.length === 1, 5_000, 'close after abort');
    assert.is(e.endpoint.send(Buffer.alloc(1), '127.0.0.1:9'), false);
  });

  s.run();
}

// ---------------------------------------------------------------------------
// tcp framing

function tcpExtras(mod: typeof import('../../plugins/transport-tcp.ts')): void {
  const { RecordReader } = mod;
  const s = suite('transport tcp: framing');

  s('the reader reassembles records split across chunks of any size', () => {
    const sizes = [0, 1, 2, 255, 256, 1000, 16384, MAX, 0, 3, MAX, 0];
    const records = sizes.map((n, i) => patterned(i, n));
    const stream = Buffer.concat(records.map((r) => Buffer.concat([Buffer.from([r.length >> 8, r.length & 0xff]), r])));
    for (const chunkSize of [1, 2, 3, 7, 1000, 65537, stream.length]) {
      const got: Buffer[] = [];
      const reader = new RecordReader((r) => got.push(Buffer.from(r)));
      for (let at = 0; at < stream.length; at += chunkSize) reader.push(stream.subarray(at, at + chunkSize));
      assertRecords(got, sizes, `chunks of ${chunkSize}`);
    }
  });

  s('a record inside one chunk is delivered as a subarray of it (no copy)', () => {
    const chunk = Buffer.from([0, 3, 1, 2, 3, 0, 0, 0, 2, 9, 9]);
    const got: Buffer[] = [];
    new RecordReader((r) => got.push(r)).push(chunk);
    assert.is(got.length, 3);
    assert.equal([...got[0]!], [1, 2, 3]);
    assert.is(got[0]!.buffer, chunk.buffer, 'same memory');
    assert.is(got[0]!.byteOffset, chunk.byteOffset + 2);
    assert.is(got[1]!.length, 0);
    assert.is(got[2]!.buffer, chunk.buffer);
  });

  /**
   * Feeds `stream` to a reader the way a socket with `onread` does: each read
   * writes at most `readSize` bytes at the start of the memory the reader
   * handed out. Returns the records and how many bytes the reader moved (the
   * bytes in front of the first read into each piece of memory).
   */
  function readInPlace(stream: Buffer, readSize: number): { got: Buffer[]; moved: number; memories: number } {
    const got: Buffer[] = [];
    const reader = new RecordReader((r) => got.push(r));
    const firstWrite = new Map<ArrayBufferLike, number>();
    for (let at = 0; at < stream.length; ) {
      const memory = reader.readBuffer();
      assert.ok(memory.length > 0, 'never an empty read buffer');
      if (!firstWrite.has(memory.buffer)) firstWrite.set(memory.buffer, memory.byteOffset);
      const n = Math.min(memory.length, readSize, stream.length - at);
      stream.copy(memory, 0, at, at + n);
      at += n;
      reader.wrote(n);
    }
    // Every byte in front of the socket's first write into a piece of memory was put there by the reader.
    let moved = 0;
    for (const offset of firstWrite.values()) moved += offset;
    return { got, moved, memories: firstWrite.size };
  }

  function framed(records: Buffer[]): Buffer {
    return Buffer.concat(records.map((r) => Buffer.concat([Buffer.from([r.length >> 8, r.length & 0xff]), r])));
  }

  s('reading in place (onread) delivers the same records for reads of any size', () => {
    const sizes = [0, 1, 2, 255, 256, 1000, 16384, MAX, 0, 3, MAX, 0, 5000, MAX, MAX, 1, MAX, 40000, 30000, MAX];
    const stream = framed(sizes.map((n, i) => patterned(i, n)));
    for (const readSize of [1, 2, 3, 7, 1000, 65536, 65537, 200_000, stream.length]) {
      const { got } = readInPlace(stream, readSize);
      assertRecords(got, sizes, `reads of ${readSize}`);
    }
  });

  s('reading in place, bulk records arrive where the kernel put them: only the next header is moved', () => {
    const sizes = Array.from({ length: 40 }, () => MAX);
    const stream = framed(sizes.map((n, i) => patterned(i, n)));
    for (const readSize of [1000, 16384, 65536, 70_000, 200_000, stream.length]) {
      const { got, moved, memories } = readInPlace(stream, readSize);
      assertRecords(got, sizes, `reads of ${readSize}`);
      assert.ok(memories <= sizes.length + 1, `reads of ${readSize}: ${memories} pieces of memory for ${sizes.length} records`);
      assert.ok(moved <= 2 * memories, `reads of ${readSize}: ${moved} bytes moved, expected at most a header per piece of memory`);
    }
  });

  s('reading in place, small records share memory and are not moved', () => {
    const sizes = Array.from({ length: 2000 }, (_, i) => (i * 37) % 700);
    const stream = framed(sizes.map((n, i) => patterned(i, n)));
    const { got, moved, memories } = readInPlace(stream, 1500);
    assertRecords(got, sizes, 'small records');
    assert.ok(memories <= Math.ceil(stream.length / (65539 - 702)) + 1, `${memories} pieces of memory for ${stream.length} bytes`);
    assert.ok(moved <= 702 * memories, `${moved} bytes moved`);
  });

  s('a reader moved from chunks to reads in place mid-stream (or moved back first) delivers the same records', () => {
    const sizes = [0, 1, 2, 255, 1000, MAX, 3, MAX, 0, 40000, MAX, 7];
    const stream = framed(sizes.map((n, i) => patterned(i, n)));
    // Cut points inside a header, inside a body, on a boundary, and around the largest records.
    const cuts = [0, 1, 2, 3, 4, 5, 300, 1264, 1265, 1266, 1267, 1268, 40_000, 66_803, 66_804, 66_805, 100_000, stream.length - 1, stream.length];
    for (const cut of cuts) {
      for (const chunkSize of [1, 1000, 65536]) {
        const got: Buffer[] = [];
        const reader = new RecordReader((r) => got.push(Buffer.from(r)));
        for (let at = 0; at < cut; at += chunkSize) reader.push(stream.subarray(at, Math.min(cut, at + chunkSize)));
        reader.readFromNowOn();
        if (chunkSize === 1000) {
          // Undone (the socket could not be made again), then done for good: nothing lost or doubled.
          reader.readFromChunks();
          reader.readFromNowOn();
        }
        for (let at = cut; at < stream.length; ) {
          const memory = reader.readBuffer();
          const n = Math.min(memory.length, 65536, stream.length - at);
          stream.copy(memory, 0, at, at + n);
          at += n;
          reader.wrote(n);
        }
        assertRecords(got, sizes, `cut at ${cut}, chunks of ${chunkSize}`);
      }
    }
  });

  s('an accepted link that carries bulk records reads them in place from then on; one with small records never does', async () => {
    const pair = await connectPair(mod.default.create({ connectTimeout: 5000, keepAlive: 0 }, testContext()) as StreamTransportPlugin);
    try {
      const bulk = Array.from({ length: 64 }, () => MAX);
      const small = Array.from({ length: 1000 }, (_, i) => 1 + ((i * 37) % 700));
      const got: Buffer[] = [];
      let want = small.length;
      let reached!: () => void;
      let arrived = new Promise<void>((r) => (reached = r));
      pair.server.start({
        record(r) {
          got.push(r);
          if (got.length === want) reached();
        },
        drain() {},
        close() {},
      });
      const toClient: Buffer[] = [];
      const clientCloses: (Error | undefined)[] = [];
      pair.client.start({ record: (r) => void toClient.push(Buffer.from(r)), drain() {}, close: (e) => void clientCloses.push(e) });
      const inPlace = (r: Buffer) => r.byteOffset === 2 && r.buffer.byteLength === 2 + MAX + 2;
      // Small records, a few at a time, as a link that carries messages has them.
      for (let i = 0; i < small.length; i += 10) {
        pair.client.sendBatch(small.slice(i, i + 10).map((n, j) => patterned(i + j, n)));
        await sleep(1);
      }
      await withTimeout(arrived, 10_000, 'the small records');
      assertRecords(got.map((r) => Buffer.from(r)), small, 'small records');
      assert.is(got.filter((r) => r.buffer.byteLength === 2 + MAX + 2).length, 0, 'no small record was read in place');

      got.length = 0;
      want = bulk.length;
      arrived = new Promise<void>((r) => (reached = r));
      for (let i = 0; i < bulk.length; i++) pair.client.send(patterned(i, MAX));
      await withTimeout(arrived, 10_000, 'the bulk records');
      assertRecords(got.map((r) => Buffer.from(r)), bulk, 'bulk records');
      assert.not.ok(inPlace(got[0]!), 'the first bulk record came in a chunk of its own');
      assert.ok(got.slice(-16).every(inPlace), 'the last records each lie in memory of their own, after their header');

      // The socket made again writes, and closes the link as the accepted one would.
      for (let i = 0; i < 3; i++) pair.server.send(patterned(i, 1000));
      pair.server.close();
      await withTimeout(
        (async () => {
          while (clientCloses.length === 0) await sleep(5);
        })(),
        5_000,
        "the client to see the server's close",
      );
      assertRecords(toClient, [1000, 1000, 1000], 'records from the server after the switch');
      assert.equal(clientCloses, [undefined], 'a clean close');
    } finally {
      await pair.cleanup();
    }
  });

  s('a dialed link reads in place: each full record from the server lies in memory of its own, after its header', async () => {
    const pair = await connectPair(mod.default.create({ connectTimeout: 5000, keepAlive: 0 }, testContext()) as StreamTransportPlugin);
    try {
      const got: Buffer[] = [];
      const done = new Promise<void>((resolve) => {
        pair.client.start({
          record(r) {
            got.push(r);
            if (got.length === 3) resolve();
          },
          drain() {},
          close() {},
        });
      });
      pair.server.start({ record() {}, drain() {}, close() {} });
      for (let i = 0; i < 3; i++) pair.server.send(patterned(i, MAX));
      await withTimeout(done, 5_000, 'three records');
      assertRecords(got.map((r) => Buffer.from(r)), [MAX, MAX, MAX], 'records');
      // Node's own reads are 64 KiB, one byte short of such a record and its header, so each would
      // have been copied into a buffer of exactly its size; read in place, each is where the kernel put it.
      for (const r of got) assert.equal([r.byteOffset, r.buffer.byteLength], [2, 2 + MAX + 2], 'a record at the start of its own read memory');
    } finally {
      await pair.cleanup();
    }
  });

  s('garbage bytes from a plain socket parse as records, without a crash; EOF closes the link', async () => {
    const ctx = testContext();
    const t = mod.default.create({ connectTimeout: 5000, keepAlive: 0 }, ctx) as StreamTransportPlugin;
    let probe: LinkProbe | undefined;
    const listener = await t.listen('127.0.0.1:0', (l) => (probe = probeLink(l)));
    const sock = net.connect(Number(listener.address.split(':')[1]), '127.0.0.1');
    try {
      await withTimeout(new Promise((r) => sock.once('connect', r)), 5_000, 'raw connect');
      // Deterministic garbage, sent in uneven chunks.
      const garbage = Buffer.alloc(300_000);
      let x = 12345;
      for (let i = 0; i < garbage.length; i++) {
        x = (x * 1103515245 + 12345) >>> 0;
        garbage[i] = x >>> 24;
      }
      for (let at = 0, n = 1; at < garbage.length; at += n, n = (n * 7 + 3) % 5000) sock.write(garbage.subarray(at, at + n));
      sock.end();
      // What the framing says the garbage contains: whole records only.
      const expected: Buffer[] = [];
      for (let at = 0; at + 2 <= garbage.length; ) {
        const len = garbage.readUInt16BE(at);
        if (at + 2 + len > garbage.length) break;
        expected.push(garbage.subarray(at + 2, at + 2 + len));
        at += 2 + len;
      }
      await withTimeout(
        (async () => {
          while (!probe || probe.closes.length === 0) await sleep(10);
        })(),
        5_000,
        'the garbage link to close',
      );
      assert.is(probe!.records.length, expected.length, 'records parsed from garbage');
      for (let i = 0; i < expected.length; i++) assert.ok(probe!.records[i]!.equals(expected[i]!), `garbage record ${i}`);
      assert.is(probe!.closes.length, 1);
    } finally {
      sock.destroy();
      probe?.link.destroy();
      await listener.close();
    }
  });

  s.run();
}

// ---------------------------------------------------------------------------
// discovery: every transport plugin on disk goes through the suite.
// Everything async happens first: uvu starts running once the first suite is
// queued and a tick passes, so all suites must be queued together.

const files = readdirSync(PLUGIN_DIR)
  .filter((f) => /^transport-[\w-]+\.ts$/.test(f))
  .sort();
const covered = new Map<string, 'stream' | 'datagram'>();
const streamTransports: { name: string; make: Make<StreamTransportPlugin> }[] = [];
const datagramTransports: { name: string; make: Make<DatagramTransportPlugin> }[] = [];

for (const file of files) {
  const def = checkPluginDefinition((await import(new URL(file, PLUGIN_DIR).href)).default, 'transport', file);
  const make = (ctx: PluginContext) => def.create({}, ctx) as TransportPlugin | Promise<TransportPlugin>;
  const probeInstance = await make(testContext());
  await probeInstance.close?.();
  assert.is(`transport-${def.name}.ts`, file, 'file name matches the plugin name');
  if (probeInstance.type === 'datagram') {
    datagramTransports.push({ name: def.name, make: make as Make<DatagramTransportPlugin> });
  } else {
    streamTransports.push({ name: def.name, make: make as Make<StreamTransportPlugin> });
  }
  covered.set(def.name, probeInstance.type);
}
const tcpModule = covered.has('tcp') ? await import('../../plugins/transport-tcp.ts') : undefined;

for (const { name, make } of streamTransports) streamSuite(name, make);
for (const { name, make } of datagramTransports) datagramSuite(name, make);
if (tcpModule) tcpExtras(tcpModule);

test('every built-in transport is covered by this suite', () => {
  assert.ok(files.includes('transport-tcp.ts') && files.includes('transport-ws.ts'), 'tcp and ws exist');
  assert.is(covered.get('udp'), 'datagram', 'udp is checked as a datagram transport');
  assert.equal(
    [...covered.keys()].sort(),
    files.map((f) => f.replace(/^transport-|\.ts$/g, '')).sort(),
  );
});
test.run();
