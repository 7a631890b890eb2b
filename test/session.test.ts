/**
 * core/session.ts over an in-memory Link pair: handshake, silence on every
 * kind of bad initiation, tampering, rekey under load, close and backpressure.
 */
import { randomBytes, randomFillSync } from 'node:crypto';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import type { CipherState } from '../core/noise.ts';
import {
  acceptSession,
  connectSession,
  ReplayGuard,
  type ClientHandshakeOptions,
  type ServerAcceptOptions,
  type Session,
  type SessionHandlers,
} from '../core/session.ts';
import type { AuthPlugin, CipherPlugin, ClientIdentity, Link, Logger } from '../core/types.ts';
import { tai64nNow } from '../core/replay.ts';
import { generateKeyPair, type KeyPair } from '../core/x25519.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';
import aesDef from '../plugins/cipher-aes-256-gcm.ts';
import { memLinkPair, type MemLink, type MemLinkOptions } from './helpers/memlink.ts';
import { withTimeout } from './helpers/timeout.ts';

const chacha = chachaDef.create({}, undefined as never) as CipherPlugin;
const aes = aesDef.create({}, undefined as never) as CipherPlugin;

// ---------------------------------------------------------------------------
// fixtures

interface LogEntry {
  level: string;
  msg: string;
  fields?: Record<string, unknown>;
}

function recordingLogger(entries: LogEntry[] = []): Logger & { entries: LogEntry[] } {
  const at =
    (level: string) =>
    (msg: string, fields?: Record<string, unknown>): void => {
      entries.push({ level, msg, fields });
    };
  const log: Logger & { entries: LogEntry[] } = {
    entries,
    debug: at('debug'),
    info: at('info'),
    warn: at('warn'),
    error: at('error'),
    child: () => log,
  };
  return log;
}

function keysAuth(clients: Map<string, { name: string; psk?: Buffer }>): AuthPlugin {
  return {
    name: 'test',
    authorize(key: Buffer): ClientIdentity | null {
      const entry = clients.get(key.toString('base64'));
      return entry ? { name: entry.name, publicKey: key.toString('base64') } : null;
    },
    psk(key?: Buffer): Buffer | undefined {
      return key ? clients.get(key.toString('base64'))?.psk : undefined;
    },
  };
}

interface World {
  server: KeyPair;
  client: KeyPair;
  clients: Map<string, { name: string; psk?: Buffer }>;
  replay: ReplayGuard;
  serverLog: ReturnType<typeof recordingLogger>;
  clientLog: ReturnType<typeof recordingLogger>;
}

function world(psk?: Buffer): World {
  const server = generateKeyPair();
  const client = generateKeyPair();
  const clients = new Map([[client.publicKey.toString('base64'), { name: 'alice', psk }]]);
  return { server, client, clients, replay: new ReplayGuard(), serverLog: recordingLogger(), clientLog: recordingLogger() };
}

interface Accepted {
  sessions: Session[];
  refused: string[];
  /** The remote address each refusal named. */
  refusedFrom: string[];
  firstSession: Promise<Session>;
  firstRefusal: Promise<string>;
}

function serve(w: World, link: Link, over: Partial<ServerAcceptOptions> = {}, cipher = chacha): Accepted {
  const out = { sessions: [] as Session[], refused: [] as string[], refusedFrom: [] as string[] } as Accepted;
  let gotSession!: (s: Session) => void;
  let gotRefusal!: (r: string) => void;
  out.firstSession = new Promise((r) => (gotSession = r));
  out.firstRefusal = new Promise((r) => (gotRefusal = r));
  acceptSession(link, {
    cipher,
    hash: 'BLAKE2s',
    staticKey: w.server,
    auth: keysAuth(w.clients),
    replay: w.replay,
    handshakeTimeoutMs: 2000,
    log: w.serverLog,
    respond: (identity, init) => ({ hello: identity.name, echo: init }),
    onSession: (s) => {
      out.sessions.push(s);
      gotSession(s);
    },
    onRefused: (reason, remote) => {
      out.refused.push(reason);
      out.refusedFrom.push(remote);
      gotRefusal(reason);
    },
    ...over,
  });
  return out;
}

function clientOpts(w: World, over: Partial<ClientHandshakeOptions> = {}): ClientHandshakeOptions {
  return {
    cipher: chacha,
    hash: 'BLAKE2s',
    staticKey: w.client,
    serverPublicKey: w.server.publicKey,
    payload: { want: 'tun' },
    handshakeTimeoutMs: 2000,
    log: w.clientLog,
    ...over,
  };
}

/** Collects what a started session delivers. */
function collector(session: Session): { got: Buffer[]; closed: Promise<Error | undefined>; drains: number; isClosed: boolean; rekeys: number } {
  const out = { got: [] as Buffer[], drains: 0, rekeys: 0, isClosed: false, closed: undefined as unknown as Promise<Error | undefined> };
  out.closed = new Promise((resolve) => {
    const handlers: SessionHandlers = {
      message: (p) => out.got.push(p),
      drain: () => out.drains++,
      rekey: () => out.rekeys++,
      close: (err) => {
        out.isClosed = true;
        resolve(err);
      },
    };
    session.start(handlers);
  });
  return out;
}

async function connectedPair(
  w: World,
  linkOpts: MemLinkOptions = {},
  clientOver: Partial<ClientHandshakeOptions> = {},
  serverOver: Partial<ServerAcceptOptions> = {},
): Promise<{ a: MemLink; b: MemLink; client: Session; server: Session }> {
  const { a, b } = memLinkPair(linkOpts);
  const accepted = serve(w, b, serverOver, clientOver.cipher ?? chacha);
  const client = await withTimeout(connectSession(a, clientOpts(w, clientOver)), 3000, 'handshake');
  const server = await withTimeout(accepted.firstSession, 3000, 'server session');
  return { a, b, client, server };
}

async function expectReject(p: Promise<unknown>, code: string, what: string): Promise<DshieldError> {
  try {
    await withTimeout(p, 5000, what);
  } catch (err) {
    assert.instance(err, DshieldError, `${what}: ${String(err)}`);
    assert.is((err as DshieldError).code, code, `${what}: ${(err as Error).message}`);
    return err as DshieldError;
  }
  throw new Error(`${what}: resolved, expected ${code}`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// replay guard

test('tai64nNow is strictly increasing, 12 bytes, TAI64 label set', () => {
  let last = tai64nNow();
  assert.is(last.length, 12);
  assert.is(last.readBigUInt64BE(0) >> 62n, 1n);
  assert.ok(Math.abs(Number(last.readBigUInt64BE(0) - (1n << 62n)) - Date.now() / 1000) < 5);
  for (let i = 0; i < 1000; i++) {
    const next = tai64nNow();
    assert.is(Buffer.compare(next, last), 1);
    last = next;
  }
});

test('ReplayGuard: strictly newer per key; equal, older and malformed are refused', () => {
  const guard = new ReplayGuard();
  const t1 = tai64nNow();
  const t2 = tai64nNow();
  assert.ok(guard.accept('k1', t1));
  assert.not.ok(guard.accept('k1', t1), 'the same timestamp again');
  assert.ok(guard.accept('k1', t2));
  assert.not.ok(guard.accept('k1', t1), 'older');
  assert.ok(guard.accept('k2', t1), 'keys are independent');
  assert.not.ok(guard.accept('k3', Buffer.alloc(11)));
  assert.is(guard.size, 2);
});

// ---------------------------------------------------------------------------
// happy paths

for (const [label, cipher, hash] of [
  ['ChaChaPoly/BLAKE2s', chacha, 'BLAKE2s'],
  ['AESGCM/SHA256', aes, 'SHA256'],
] as const) {
  test(`handshake and records both ways (${label})`, async () => {
    const w = world();
    const { a, b } = memLinkPair();
    const accepted = serve(w, b, { hash }, cipher);
    const client = await withTimeout(connectSession(a, clientOpts(w, { cipher, hash })), 3000, 'handshake');
    const server = await withTimeout(accepted.firstSession, 3000, 'server session');
    assert.equal(client.params, { hello: 'alice', echo: { want: 'tun' } });
    assert.equal(server.params, { want: 'tun' });
    assert.equal(server.peer, { name: 'alice', publicKey: w.client.publicKey.toString('base64') });
    assert.is(client.side, 'client');
    assert.is(server.side, 'server');
    assert.is(client.maxPayload, 65535 - 17);

    const c = collector(client);
    const s = collector(server);
    const big = randomBytes(client.maxPayload);
    client.send(Buffer.from('ping'));
    client.send(big);
    client.send(Buffer.alloc(0));
    server.send(Buffer.from('pong'));
    await withTimeout(
      (async () => {
        while (s.got.length < 3 || c.got.length < 1) await sleep(2);
      })(),
      3000,
      'records',
    );
    assert.is(s.got[0]!.toString(), 'ping');
    assert.ok(s.got[1]!.equals(big));
    assert.is(s.got[2]!.length, 0);
    assert.is(c.got[0]!.toString(), 'pong');
    assert.throws(() => client.send(Buffer.alloc(client.maxPayload + 1)), RangeError);
    // bytes on the wire are counted the same by both ends
    assert.is(client.bytesOut, a.sent.bytes);
    assert.is(server.bytesIn, a.sent.bytes);
    assert.is(server.bytesOut, b.sent.bytes);
    assert.ok(Date.now() - server.lastReceivedAt < 1000);
    client.destroy();
    await withTimeout(s.closed, 2000, 'server close');
    assert.equal(accepted.refused, []);
  });
}

test('sendBatch sends each payload as its own record, in order', async () => {
  const w = world();
  const { client, server } = await connectedPair(w);
  const s = collector(server);
  collector(client);
  const payloads = Array.from({ length: 20 }, (_, i) => Buffer.from(`m${i}`));
  assert.ok(client.sendBatch!(payloads));
  await withTimeout((async () => { while (s.got.length < 20) await sleep(2); })(), 3000, 'batch');
  assert.equal(s.got.map((p) => p.toString()), payloads.map((p) => p.toString()));
  client.destroy();
});

test('IKpsk2: a matching PSK connects; a wrong PSK fails with SERVER_KEY_MISMATCH', async () => {
  const psk = randomBytes(32);
  const w = world(psk);
  const ok = await connectedPair(w, {}, { psk });
  assert.equal(ok.client.params, { hello: 'alice', echo: { want: 'tun' } });
  ok.client.destroy();

  const { a, b } = memLinkPair();
  serve(w, b);
  const err = await expectReject(connectSession(a, clientOpts(w, { psk: randomBytes(32) })), ErrorCodes.SERVER_KEY_MISMATCH, 'wrong psk');
  assert.match(err.message, /PSK/);
  assert.ok(a.closed, 'link closed on failure');
});

test('a client that omits the PSK the server expects gets silence (psk mismatch)', async () => {
  const w = world(randomBytes(32));
  const { a, b } = memLinkPair();
  const accepted = serve(w, b, { handshakeTimeoutMs: 300 });
  await expectReject(connectSession(a, clientOpts(w, { handshakeTimeoutMs: 200 })), ErrorCodes.HANDSHAKE_TIMEOUT, 'no psk');
  assert.equal(await withTimeout(accepted.firstRefusal, 2000, 'refusal'), 'psk mismatch');
  assert.is(b.sent.bytes, 0);
});

// ---------------------------------------------------------------------------
// silence

test('unknown client key: the server sends 0 bytes and drops the link after the timeout', async () => {
  const w = world();
  w.clients.clear();
  const { a, b } = memLinkPair();
  const started = Date.now();
  const accepted = serve(w, b, { handshakeTimeoutMs: 250 });
  const err = await expectReject(connectSession(a, clientOpts(w, { handshakeTimeoutMs: 5000 })), ErrorCodes.HANDSHAKE_TIMEOUT, 'unknown key');
  const elapsed = Date.now() - started;
  assert.ok(elapsed >= 240, `server dropped the link after ${elapsed} ms, before its timeout`);
  assert.match(err.message, /did not answer|without answering/);
  assert.match(err.message, /man in the middle/);
  assert.is(b.sent.bytes, 0, 'the server said nothing');
  assert.equal(accepted.refused, ['unknown client key']);
  assert.equal(accepted.refusedFrom, [b.remoteAddress], 'the refusal names the link it came from');
  assert.is(w.replay.size, 0, 'nothing recorded for an unauthorized key');
});

test('random garbage records: no reply, read and discarded until the timeout', async () => {
  const w = world();
  const { a, b } = memLinkPair();
  const accepted = serve(w, b, { handshakeTimeoutMs: 300 });
  let closedAt = 0;
  a.start({ record: () => assert.unreachable('the server replied'), drain() {}, close: () => (closedAt = Date.now()) });
  const started = Date.now();
  let sent = 0;
  while (!a.closed && Date.now() - started < 2000) {
    for (let i = 0; i < 20; i++) a.send(randomBytes(1 + Math.floor(Math.random() * 2000)));
    sent += 20;
    await sleep(5);
  }
  assert.ok(a.closed, 'link closed');
  assert.ok(closedAt - started >= 280, `closed after ${closedAt - started} ms`);
  assert.ok(sent > 100);
  assert.is(b.sent.bytes, 0);
  assert.equal(accepted.refused, ['bad handshake']);
});

test('no initiation at all: dropped after the timeout, refused as timeout', async () => {
  const w = world();
  const { a, b } = memLinkPair();
  const accepted = serve(w, b, { handshakeTimeoutMs: 150 });
  a.start({ record() {}, drain() {}, close() {} });
  await withTimeout(a.whenClosed, 2000, 'link drop');
  assert.equal(accepted.refused, ['timeout']);
  assert.is(b.sent.bytes, 0);
});

test('a replayed initiation on a new link is refused with silence', async () => {
  const w = world();
  let recorded: Buffer | null = null;
  const first = await connectedPair(w, { tap: (rec, from) => ((recorded ??= from === 'a' ? Buffer.from(rec) : null), rec) });
  assert.ok(recorded !== null);
  first.client.destroy();

  const { a, b } = memLinkPair();
  const accepted = serve(w, b, { handshakeTimeoutMs: 200 });
  a.start({ record: () => assert.unreachable('the server answered a replay'), drain() {}, close() {} });
  a.send(recorded!);
  assert.is(await withTimeout(accepted.firstRefusal, 2000, 'refusal'), 'replayed initiation');
  await withTimeout(a.whenClosed, 2000, 'link drop');
  assert.is(b.sent.bytes, 0);
});

test('respond() throwing refuses with silence', async () => {
  const w = world();
  const { a, b } = memLinkPair();
  const accepted = serve(w, b, {
    handshakeTimeoutMs: 200,
    respond: () => {
      throw new DshieldError(ErrorCodes.TUN, 'address pool exhausted');
    },
  });
  await expectReject(connectSession(a, clientOpts(w, { handshakeTimeoutMs: 1000 })), ErrorCodes.HANDSHAKE_TIMEOUT, 'respond refused');
  assert.equal(accepted.refused, ['refused: address pool exhausted']);
  assert.is(b.sent.bytes, 0);
});

// ---------------------------------------------------------------------------
// client-side failures

test('a wrong pinned server key: HANDSHAKE_TIMEOUT naming the pin', async () => {
  const w = world();
  const { a, b } = memLinkPair();
  const accepted = serve(w, b, { handshakeTimeoutMs: 1000 });
  const err = await expectReject(
    connectSession(a, clientOpts(w, { serverPublicKey: generateKeyPair().publicKey, handshakeTimeoutMs: 150 })),
    ErrorCodes.HANDSHAKE_TIMEOUT,
    'wrong pin',
  );
  assert.match(err.message, /serverPublicKey/);
  assert.is(b.sent.bytes, 0);
  assert.ok(a.closed);
  assert.equal(await withTimeout(accepted.firstRefusal, 2000, 'refusal'), 'bad handshake');
});

test('an answer that fails to authenticate: SERVER_KEY_MISMATCH (tampered message 2, or garbage)', async () => {
  const w = world();
  const { a, b } = memLinkPair({ tap: (rec, from) => (from === 'b' ? (rec[40]! ^= 1, rec) : rec) });
  serve(w, b);
  const err = await expectReject(connectSession(a, clientOpts(w)), ErrorCodes.SERVER_KEY_MISMATCH, 'bad msg2');
  assert.match(err.message, /man in the middle/);

  const fake = memLinkPair();
  fake.b.start({ record: () => fake.b.send(randomBytes(64)), drain() {}, close() {} });
  await expectReject(connectSession(fake.a, clientOpts(w)), ErrorCodes.SERVER_KEY_MISMATCH, 'garbage msg2');
  assert.ok(fake.a.closed);
});

test('the link closing before an answer: HANDSHAKE_TIMEOUT at once', async () => {
  const w = world();
  const { a, b } = memLinkPair();
  b.start({ record: () => b.destroy(), drain() {}, close() {} });
  const started = Date.now();
  await expectReject(connectSession(a, clientOpts(w, { handshakeTimeoutMs: 5000 })), ErrorCodes.HANDSHAKE_TIMEOUT, 'closed');
  assert.ok(Date.now() - started < 1000);
});

// ---------------------------------------------------------------------------
// records

test('a flipped byte in a transport record closes the session with PROTOCOL', async () => {
  const w = world();
  let tamperNext = false;
  const { client, server } = await connectedPair(w, {
    tap: (rec, from) => {
      if (from === 'a' && tamperNext) {
        tamperNext = false;
        rec[rec.length >> 1]! ^= 0x10;
      }
      return rec;
    },
  });
  const s = collector(server);
  const c = collector(client);
  client.send(Buffer.from('fine'));
  await withTimeout((async () => { while (s.got.length < 1) await sleep(2); })(), 2000, 'first record');
  tamperNext = true;
  client.send(Buffer.from('this one is altered in transit'));
  const err = await withTimeout(s.closed, 2000, 'server close');
  assert.instance(err, DshieldError);
  assert.is((err as DshieldError).code, ErrorCodes.PROTOCOL);
  assert.is(s.got.length, 1, 'the altered record was not delivered');
  await withTimeout(c.closed, 2000, 'client sees the close');
});

test('records that arrive before start() are queued and delivered on start, then close', async () => {
  const w = world();
  const { client, server } = await connectedPair(w);
  for (let i = 0; i < 5; i++) client.send(Buffer.from(`early${i}`));
  client.close();
  await sleep(30);
  const s = collector(server);
  assert.equal(s.got.map((p) => p.toString()), ['early0', 'early1', 'early2', 'early3', 'early4']);
  assert.is(await withTimeout(s.closed, 2000, 'close'), undefined, 'a clean close carries no error');
});

test('graceful close: both sides see a close without error; send after close returns false', async () => {
  const w = world();
  const { client, server } = await connectedPair(w);
  const c = collector(client);
  const s = collector(server);
  server.send(Buffer.from('bye'));
  server.close();
  assert.ok(s.isClosed, 'the closing side hears close() at once (callers may exit right after)');
  assert.is(server.send(Buffer.from('late')), false);
  assert.is(await withTimeout(c.closed, 2000, 'client close'), undefined);
  assert.is(await withTimeout(s.closed, 2000, 'server close'), undefined);
  assert.equal(c.got.map((p) => p.toString()), ['bye']);
});

test('the peer vanishing without a close record is reported as an error', async () => {
  const w = world();
  const { a, client, server } = await connectedPair(w);
  const s = collector(server);
  collector(client);
  a.destroy();
  const err = await withTimeout(s.closed, 2000, 'server close');
  assert.instance(err, Error);
});

test('backpressure: send() returns false on a full link, then drain comes', async () => {
  const w = world();
  const { client, server } = await connectedPair(w, { highWaterMark: 64 * 1024 });
  const c = collector(client);
  collector(server);
  let accepted = 0;
  while (client.send(Buffer.alloc(16 * 1024))) accepted++;
  assert.ok(accepted < 10, `${accepted} records accepted before backpressure`);
  await withTimeout((async () => { while (c.drains === 0) await sleep(2); })(), 2000, 'drain');
  client.destroy();
});

test('a consumer that throws destroys the session instead of crashing', async () => {
  const w = world();
  const { client, server } = await connectedPair(w);
  collector(client);
  const closed = new Promise<Error | undefined>((resolve) =>
    server.start({ message: () => { throw new Error('consumer bug'); }, drain() {}, close: resolve }),
  );
  client.send(Buffer.from('x'));
  const err = await withTimeout(closed, 2000, 'close');
  assert.match(String(err), /consumer bug/);
});

// ---------------------------------------------------------------------------
// rekey

test('rekey every ~150 ms while records stream both ways for 1 s: nothing lost, reordered or misdecrypted', async () => {
  const w = world(randomBytes(32));
  const psk = w.clients.get(w.client.publicKey.toString('base64'))!.psk;
  // 3 ms latency: records are always in flight in both directions when the keys change.
  const { client, server } = await connectedPair(w, { highWaterMark: 1 << 20, latencyMs: 3 }, { psk, rekeyAfterMs: 150 });
  const c = collector(client);
  const s = collector(server);
  const stamp = (side: string, i: number): Buffer => {
    const body = Buffer.alloc(64 + (i % 200));
    body.write(`${side}:${i}:`);
    return body;
  };
  let sentByClient = 0;
  let sentByServer = 0;
  const until = Date.now() + 1000;
  while (Date.now() < until) {
    for (let k = 0; k < 8; k++) {
      client.send(stamp('c', sentByClient++));
      server.send(stamp('s', sentByServer++));
    }
    await new Promise((r) => setImmediate(r)); // interleave with delivery, so records are always in flight
  }
  await withTimeout(
    (async () => {
      while (s.got.length < sentByClient || c.got.length < sentByServer) {
        if (s.isClosed || c.isClosed) throw new Error(`a session closed: ${String(await (s.isClosed ? s.closed : c.closed))}`);
        await sleep(5);
      }
    })(),
    5000,
    'all records',
  );
  const check = (got: Buffer[], side: string, n: number) => {
    assert.is(got.length, n);
    for (let i = 0; i < n; i++) assert.ok(got[i]!.equals(stamp(side, i)), `${side} record ${i}`);
  };
  check(s.got, 'c', sentByClient);
  check(c.got, 's', sentByServer);
  const rekeys = (log: typeof w.clientLog) => log.entries.filter((e) => e.msg === 'rekeyed').length;
  assert.ok(rekeys(w.clientLog) >= 3, `client rekeyed ${rekeys(w.clientLog)} times`);
  assert.ok(rekeys(w.serverLog) >= 3, `server rekeyed ${rekeys(w.serverLog)} times`);
  assert.is(c.rekeys, rekeys(w.clientLog), 'handlers.rekey is called for every client rekey');
  assert.is(s.rekeys, rekeys(w.serverLog), 'handlers.rekey is called for every server rekey');
  assert.ok(sentByClient > 200, `only ${sentByClient} records`);
  client.close();
  assert.is(await withTimeout(s.closed, 2000, 'close'), undefined);
});

for (const mode of ['keep', 'copy'] as const) {
  test(`sendInPlace (link ${mode === 'keep' ? 'holds the memory until delivery' : 'copies at once'}): payloads from payloadBuffer arrive intact while rekeying, both ciphers`, async () => {
    for (const cipher of [chacha, aes]) {
      const w = world();
      // 2 ms latency and rekeys every 100 ms: records in flight under old and new keys, and 'keep' holds many at once.
      const { a, b, client, server } = await connectedPair(w, { inPlace: mode, highWaterMark: 4 << 20, latencyMs: 2 }, { cipher, rekeyAfterMs: 100 }, { cipher });
      const c = collector(client);
      const s = collector(server);
      const sent: Record<'c' | 's', Buffer[]> = { c: [], s: [] };
      const until = Date.now() + 600;
      let i = 0;
      while (Date.now() < until) {
        for (const [side, session] of [['c', client], ['s', server]] as const) {
          const room = session.payloadBuffer!();
          assert.ok(room.length >= session.maxPayload, 'payloadBuffer holds maxPayload bytes');
          const n = [1, 1400, 16_384, session.maxPayload][i % 4]!;
          const payload = room.subarray(0, n);
          randomFillSync(payload);
          sent[side].push(Buffer.from(payload));
          session.sendInPlace!(payload);
        }
        if (++i % 8 === 0) await new Promise((r) => setImmediate(r));
      }
      await withTimeout(
        (async () => {
          while (s.got.length < sent.c.length || c.got.length < sent.s.length) {
            if (s.isClosed || c.isClosed) throw new Error(`a session closed: ${String(await (s.isClosed ? s.closed : c.closed))}`);
            await sleep(5);
          }
        })(),
        5000,
        'all records',
      );
      for (const [got, want, who] of [[s.got, sent.c, 'client'], [c.got, sent.s, 'server']] as const) {
        assert.is(got.length, want.length, `${cipher.name}: records from the ${who}`);
        for (let k = 0; k < want.length; k++) assert.ok(got[k]!.equals(want[k]!), `${cipher.name}: record ${k} from the ${who} intact`);
      }
      assert.ok(a.sent.inPlace >= i && b.sent.inPlace >= i, `${cipher.name}: records went through link.sendInPlace (${a.sent.inPlace}, ${b.sent.inPlace})`);
      assert.ok(c.rekeys >= 2, `${cipher.name}: rekeyed ${c.rekeys} times while sending`);
      client.close();
      assert.is(await withTimeout(s.closed, 2000, 'close'), undefined);
    }
  });
}

test('keys older than rejectAfterMs close the session when the client does not rekey', async () => {
  const w = world();
  const { client, server } = await connectedPair(w, {}, { rekeyAfterMs: 60_000 }, { rejectAfterMs: 200 });
  const s = collector(server);
  const c = collector(client);
  const err = await withTimeout(s.closed, 2000, 'server expiry');
  assert.instance(err, DshieldError);
  assert.is((err as DshieldError).code, ErrorCodes.PROTOCOL);
  assert.match(err!.message, /older than 200 ms/);
  await withTimeout(c.closed, 2000, 'client sees it');
});

test('a rekey keeps the session alive past rejectAfterMs', async () => {
  const w = world();
  const { client, server } = await connectedPair(w, {}, { rekeyAfterMs: 80, rejectAfterMs: 250 }, { rejectAfterMs: 250 });
  const s = collector(server);
  const c = collector(client);
  for (let i = 0; i < 6; i++) {
    await sleep(100);
    client.send(Buffer.from(`tick${i}`));
    server.send(Buffer.from(`tock${i}`));
  }
  await sleep(30);
  assert.is(s.got.length, 6);
  assert.is(c.got.length, 6);
  client.close();
  assert.is(await withTimeout(s.closed, 2000, 'close'), undefined);
});

test('a client removed from the server is cut off at its next rekey', async () => {
  const w = world();
  const { client, server } = await connectedPair(w, {}, { rekeyAfterMs: 100 });
  const s = collector(server);
  collector(client);
  w.clients.clear();
  const err = await withTimeout(s.closed, 2000, 'cut off');
  assert.match(String(err), /unknown client key/);
});

/** White-box access to a session's current keys, to fast-forward counters. */
function keysOf(session: Session): { sendKey: CipherState; receiveKey: CipherState } {
  return session as unknown as { sendKey: CipherState; receiveKey: CipherState };
}

test('the client rekeys after 2^48 records without losing the record that triggered it', async () => {
  const w = world();
  const { client, server } = await connectedPair(w, {}, { rekeyAfterMs: 60_000 });
  const c = collector(client);
  const s = collector(server);
  keysOf(client).sendKey.counter = 2 ** 48 - 2;
  keysOf(server).receiveKey.counter = 2 ** 48 - 2;
  for (let i = 0; i < 5; i++) client.send(Buffer.from(`r${i}`));
  await withTimeout((async () => { while (s.got.length < 5 || c.rekeys < 1) await sleep(2); })(), 2000, 'count rekey');
  assert.equal(s.got.map((p) => p.toString()), ['r0', 'r1', 'r2', 'r3', 'r4']);
  assert.is(keysOf(client).sendKey.counter < 10, true, 'new keys in use');
  client.send(Buffer.from('after'));
  await withTimeout((async () => { while (s.got.length < 6) await sleep(2); })(), 2000, 'record under new keys');
  assert.is(c.isClosed || s.isClosed, false);
  client.close();
});

test('a sending counter that reaches 2^53 - 1 closes the session instead of wrapping', async () => {
  const w = world();
  const { client, server } = await connectedPair(w);
  const c = collector(client);
  const s = collector(server);
  keysOf(server).sendKey.counter = Number.MAX_SAFE_INTEGER - 2;
  keysOf(client).receiveKey.counter = Number.MAX_SAFE_INTEGER - 2;
  assert.ok(server.send(Buffer.from('last but one')));
  assert.ok(server.send(Buffer.from('last')));
  assert.is(server.send(Buffer.from('one too many')), false);
  const err = await withTimeout(s.closed, 2000, 'server close');
  assert.is((err as DshieldError).code, ErrorCodes.PROTOCOL);
  assert.match(err!.message, /ran out of record counters/);
  await withTimeout(c.closed, 2000, 'client close');
  assert.equal(c.got.map((p) => p.toString()), ['last but one', 'last']);
});

test('a datagram link is refused as unsupported', async () => {
  const w = world();
  let destroyed = false;
  const dgram: Link = {
    type: 'datagram', remoteAddress: '127.0.0.1:9', maxRecordSize: 1400, bufferedAmount: 0,
    start() {}, send: () => true, sendBatch: () => true, close() {}, destroy: () => void (destroyed = true),
  };
  await expectReject(connectSession(dgram, clientOpts(w)), ErrorCodes.UNSUPPORTED, 'datagram');
  assert.ok(destroyed);
});

test.run();
