/**
 * core/session-datagram.ts: the handshake with retransmission, records over
 * a network that loses, duplicates and reorders, silence towards strangers
 * and garbage, roaming (in memory and over real UDP through a relay that
 * changes its port), rekey under traffic, expiry and close.
 *
 * Most tests run over test/helpers/datagram-net.ts (deterministic loss,
 * duplication and reordering); the roaming test also runs over the udp
 * transport on 127.0.0.1.
 */
import { randomBytes } from 'node:crypto';
import dgram from 'node:dgram';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { ReplayGuard, type ClientHandshakeOptions, type Session, type SessionHandlers } from '../core/session.ts';
import { initiatorFactory, writeInitiation } from '../core/handshake.ts';
import {
  acceptDatagramSessions,
  connectDatagramSession,
  DATAGRAM_RECORD_OVERHEAD,
  type DatagramAcceptOptions,
  type DatagramAcceptor,
} from '../core/session-datagram.ts';
import type { AuthPlugin, CipherPlugin, ClientIdentity, DatagramEndpoint, DatagramTransportPlugin, Logger } from '../core/types.ts';
import { generateKeyPair, type KeyPair } from '../core/x25519.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';
import aesDef from '../plugins/cipher-aes-256-gcm.ts';
import udpDef from '../plugins/transport-udp.ts';
import { testContext } from './helpers/context.ts';
import { DatagramNet, seededRandom, type Fate, type InFlight, type MemEndpoint } from './helpers/datagram-net.ts';
import { withTimeout } from './helpers/timeout.ts';

const chacha = chachaDef.create({}, undefined as never) as CipherPlugin;
const aes = aesDef.create({}, undefined as never) as CipherPlugin;

const SERVER = '192.0.2.1:51820';
const CLIENT = '198.51.100.7:40000';

// ---------------------------------------------------------------------------
// fixtures

const quiet: Logger = { debug() {}, info() {}, warn() {}, error() {}, child: () => quiet };

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
}

function world(psk?: Buffer): World {
  const server = generateKeyPair();
  const client = generateKeyPair();
  return { server, client, clients: new Map([[client.publicKey.toString('base64'), { name: 'alice', psk }]]), replay: new ReplayGuard() };
}

interface Served {
  acceptor: DatagramAcceptor;
  sessions: Session[];
  refused: Array<{ reason: string; remote: string }>;
  firstSession: Promise<Session>;
}

function serve(w: World, endpoint: DatagramEndpoint, over: Partial<DatagramAcceptOptions> = {}, cipher = chacha): Served {
  const out = { sessions: [] as Session[], refused: [] as Served['refused'] } as Served;
  let gotSession!: (s: Session) => void;
  out.firstSession = new Promise((r) => (gotSession = r));
  out.acceptor = acceptDatagramSessions(endpoint, {
    cipher,
    hash: 'BLAKE2s',
    staticKey: w.server,
    auth: keysAuth(w.clients),
    replay: w.replay,
    handshakeTimeoutMs: 3000,
    log: quiet,
    respond: (identity, init) => ({ hello: identity.name, echo: init }),
    onSession: (s) => {
      out.sessions.push(s);
      gotSession(s);
    },
    onRefused: (reason, remote) => out.refused.push({ reason, remote }),
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
    payload: { want: 'udp' },
    handshakeTimeoutMs: 5000,
    log: quiet,
    ...over,
  };
}

interface Collected {
  got: Buffer[];
  rekeys: number;
  closed: Promise<Error | undefined>;
  isClosed: boolean;
}

function collector(session: Session, onMessage?: (p: Buffer) => void): Collected {
  const out = { got: [] as Buffer[], rekeys: 0, isClosed: false } as Collected;
  out.closed = new Promise((resolve) => {
    const handlers: SessionHandlers = {
      message: (p) => {
        out.got.push(p);
        onMessage?.(p);
      },
      drain() {},
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

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, ms: number, what: string): Promise<void> {
  await withTimeout(
    (async () => {
      while (!cond()) await sleep(5);
    })(),
    ms,
    what,
  );
}

async function expectReject(p: Promise<unknown>, code: string, what: string): Promise<DshieldError> {
  try {
    await withTimeout(p, 10_000, what);
  } catch (err) {
    assert.instance(err, DshieldError, `${what}: ${String(err)}`);
    assert.is((err as DshieldError).code, code, `${what}: ${(err as Error).message}`);
    return err as DshieldError;
  }
  throw new Error(`${what}: resolved, expected ${code}`);
}

/** A net, a server endpoint serving `w`, and a client endpoint. */
function setup(w: World, fate?: (d: InFlight) => Fate, serverOver: Partial<DatagramAcceptOptions> = {}, cipher = chacha) {
  const net = new DatagramNet({ fate });
  const serverEnd = net.endpoint(SERVER);
  const clientEnd = net.endpoint(CLIENT);
  const served = serve(w, serverEnd, serverOver, cipher);
  return { net, serverEnd, clientEnd, served };
}

const isInitiation = (d: InFlight) => d.data[0] === 1;
const isData = (d: InFlight) => d.data[0] === 4;

/** A numbered payload: index (4 bytes) then filler. */
function numbered(i: number, size = 64): Buffer {
  const b = Buffer.alloc(size, i & 0xff);
  b.writeUInt32BE(i, 0);
  return b;
}

// ---------------------------------------------------------------------------
// handshake and records

for (const [label, cipher, hash] of [
  ['ChaChaPoly/BLAKE2s', chacha, 'BLAKE2s'],
  ['AESGCM/SHA256', aes, 'SHA256'],
] as const) {
  test(`handshake and records both ways (${label})`, async () => {
    const w = world();
    const { net, clientEnd, served } = setup(w, undefined, { hash }, cipher);
    try {
      const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w, { cipher, hash })), 3000, 'handshake');
      const server = await withTimeout(served.firstSession, 3000, 'server session');
      assert.equal(client.params, { hello: 'alice', echo: { want: 'udp' } });
      assert.equal(server.params, { want: 'udp' });
      assert.equal(server.peer, { name: 'alice', publicKey: w.client.publicKey.toString('base64') });
      assert.is(client.lossy, true);
      assert.is(server.lossy, true);
      assert.is(client.maxPayload, 1457 - DATAGRAM_RECORD_OVERHEAD);
      assert.is(server.remoteAddress, CLIENT);
      assert.is(client.remoteAddress, SERVER);

      const c = collector(client);
      const s = collector(server);
      const big = randomBytes(client.maxPayload);
      client.send(Buffer.from('ping'));
      client.send(big);
      client.send(Buffer.alloc(0));
      server.send(Buffer.from('pong'));
      await until(() => s.got.length >= 3 && c.got.length >= 1, 3000, 'records');
      assert.equal(
        s.got.map((p) => p.length),
        [4, big.length, 0],
      );
      assert.ok(s.got[1]!.equals(big));
      assert.is(c.got[0]!.toString(), 'pong');
      assert.throws(() => client.send(Buffer.alloc(client.maxPayload + 1)), RangeError);
      assert.is(served.acceptor.sessions, 1);
      assert.equal(served.refused, []);
      client.close();
      assert.is(await withTimeout(s.closed, 2000, 'server close'), undefined, 'a clean close carries no error');
      assert.ok(clientEnd.closed, 'the client session closed its endpoint');
      assert.is(served.acceptor.sessions, 0);
    } finally {
      net.close();
    }
  });
}

test('sendInPlace seals a payload where payloadBuffer() put it; the memory is reused only while the endpoint holds no datagram', async () => {
  const w = world();
  const { net, clientEnd, served } = setup(w);
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const s = collector(await withTimeout(served.firstSession, 3000, 'server session'));
    const first = client.payloadBuffer!();
    assert.ok(first.length >= client.maxPayload, 'room for the largest payload');
    numbered(1, 100).copy(first);
    assert.ok(client.sendInPlace!(first.subarray(0, 100)));
    const second = client.payloadBuffer!();
    assert.is(second.buffer, first.buffer, 'the endpoint took the datagram at once: the same memory again');
    clientEnd.pending = 1;
    numbered(2, client.maxPayload).copy(second);
    assert.ok(client.sendInPlace!(second.subarray(0, client.maxPayload)));
    assert.ok(client.payloadBuffer!().buffer !== second.buffer, 'the endpoint may still hold it: new memory');
    clientEnd.pending = 0;
    assert.ok(client.sendInPlace!(numbered(3, 50)), 'a payload from elsewhere is copied, not written around');
    await until(() => s.got.length >= 3, 3000, 'records');
    assert.ok(s.got[0]!.equals(numbered(1, 100)));
    assert.ok(s.got[1]!.equals(numbered(2, client.maxPayload)));
    assert.ok(s.got[2]!.equals(numbered(3, 50)));
    client.close();
  } finally {
    net.close();
  }
});

test('reordered and duplicated records: each payload delivered exactly once', async () => {
  const w = world();
  const random = seededRandom(7);
  let reordered = 0;
  const { net, clientEnd, served } = setup(w, (d) => {
    if (!isData(d)) return 'deliver';
    // Up to 15 ms of jitter reorders; one in four goes twice.
    return { delayMs: Math.floor(random() * 15), copies: random() < 0.25 ? 2 : 1 };
  });
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const c = collector(client);
    let last = -1;
    const s = collector(server, (p) => {
      const i = p.readUInt32BE(0);
      if (i < last) reordered++;
      last = Math.max(last, i);
    });
    const n = 600;
    for (let i = 0; i < n; i++) {
      client.send(numbered(i));
      if (i % 50 === 49) await sleep(2);
    }
    await until(() => s.got.length >= n, 5000, `${n} payloads`);
    await sleep(60); // late duplicates would arrive by now
    const seen = s.got.map((p) => p.readUInt32BE(0));
    assert.is(seen.length, n, 'no payload delivered twice');
    assert.is(new Set(seen).size, n, 'every payload delivered');
    assert.ok(reordered > 10, `the network did reorder (${reordered} late arrivals)`);
    assert.ok(net.delivered > n * 1.15, 'the network did duplicate');
    assert.is(c.got.length, 0);
    client.destroy();
  } finally {
    net.close();
  }
});

test('a lost initiation and a lost CONFIRM are retransmitted; the session comes up', async () => {
  const w = world();
  let initiations = 0;
  let clientRecords = 0;
  const { net, clientEnd, served } = setup(w, (d) => {
    if (d.from === CLIENT && isInitiation(d)) return initiations++ === 0 ? 'drop' : 'deliver';
    if (d.from === CLIENT && isData(d)) return clientRecords++ === 0 ? 'drop' : 'deliver';
    return 'deliver';
  });
  try {
    const started = Date.now();
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 8000, 'handshake');
    const elapsed = Date.now() - started;
    assert.is(initiations, 2, 'one retransmitted initiation');
    assert.is(clientRecords, 2, 'one retransmitted CONFIRM');
    assert.ok(elapsed >= 1900, `retransmissions waited (1 s, then 1 s): ${elapsed} ms`);
    const server = await withTimeout(served.firstSession, 1000, 'server session');
    const s = collector(server);
    client.send(Buffer.from('after retransmission'));
    await until(() => s.got.length === 1, 2000, 'a record');
    assert.is(served.sessions.length, 1, 'one session announced');
    client.destroy();
  } finally {
    net.close();
  }
});

test('answers to several retransmitted initiations: one session, the others expire silently', async () => {
  const w = world();
  // Responses take 1.5 s: the client retransmits before the first answer arrives.
  const { net, clientEnd, served } = setup(w, (d) => (d.from === SERVER && d.data[0] === 2 ? { delayMs: 1500 } : 'deliver'), {
    handshakeTimeoutMs: 2500,
  });
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 6000, 'handshake');
    await withTimeout(served.firstSession, 1000, 'server session');
    assert.ok(clientEnd.sent.to.get(SERVER)! >= 3, 'at least two initiations and a CONFIRM');
    await until(() => served.acceptor.halfOpen === 0, 4000, 'unused answers to expire');
    assert.is(served.sessions.length, 1);
    assert.is(served.acceptor.sessions, 1);
    client.destroy();
  } finally {
    net.close();
  }
});

// ---------------------------------------------------------------------------
// silence

test('unknown client key: HANDSHAKE_TIMEOUT, and the server sends nothing at all', async () => {
  const w = world();
  w.clients.clear();
  const { net, serverEnd, clientEnd, served } = setup(w);
  try {
    const err = await expectReject(
      connectDatagramSession(clientEnd, SERVER, clientOpts(w, { handshakeTimeoutMs: 1500 })),
      ErrorCodes.HANDSHAKE_TIMEOUT,
      'unknown key',
    );
    assert.match(err.message, /did not answer/);
    assert.match(err.message, /man in the middle/);
    assert.ok(clientEnd.sent.count >= 2, 'the client retransmitted');
    assert.is(serverEnd.sent.count, 0, 'the server sent 0 datagrams');
    assert.ok(served.refused.length >= 1 && served.refused.every((r) => r.reason === 'unknown client key' && r.remote === CLIENT));
    assert.is(w.replay.size, 0, 'nothing recorded for an unauthorized key');
    assert.ok(clientEnd.closed, 'a failed connect closes its endpoint');
  } finally {
    net.close();
  }
});

test('a wrong pinned server key: HANDSHAKE_TIMEOUT and silence; a forged answer: SERVER_KEY_MISMATCH', async () => {
  const w = world();
  const { net, serverEnd, clientEnd, served } = setup(w);
  try {
    await expectReject(
      connectDatagramSession(clientEnd, SERVER, clientOpts(w, { serverPublicKey: generateKeyPair().publicKey, handshakeTimeoutMs: 1200 })),
      ErrorCodes.HANDSHAKE_TIMEOUT,
      'wrong pin',
    );
    assert.is(serverEnd.sent.count, 0);
    assert.ok(served.refused.every((r) => r.reason === 'bad handshake'));

    // A fake server answers every initiation with garbage addressed to the right index.
    const fakeNet = new DatagramNet();
    const fake = fakeNet.endpoint(SERVER);
    const victim = fakeNet.endpoint(CLIENT);
    fake.start({
      datagram(data, from) {
        const answer = randomBytes(120);
        answer[0] = 2;
        data.copy(answer, 5, 1, 5); // receiver index = the client's sender index
        fake.send(answer, from);
      },
      drain() {},
      close() {},
    });
    const err = await expectReject(
      connectDatagramSession(victim, SERVER, clientOpts(w, { handshakeTimeoutMs: 1200 })),
      ErrorCodes.SERVER_KEY_MISMATCH,
      'forged answer',
    );
    assert.match(err.message, /man in the middle/);
    fakeNet.close();
  } finally {
    net.close();
  }
});

test('garbage datagrams get no reply, cost no state, and a good client is still served', async () => {
  const w = world();
  // The server's receiver index for this client, read off the client's records (an attacker on the path sees it too).
  let realIndex = 0;
  const { net, serverEnd, clientEnd, served } = setup(w, (d) => {
    if (d.from === CLIENT && isData(d)) realIndex = d.data.readUInt32LE(1);
    return 'deliver';
  });
  const attackerAddress = '203.0.113.66:6666';
  const attacker = net.endpoint(attackerAddress);
  attacker.start({ datagram: () => assert.unreachable('the server answered garbage'), drain() {}, close() {} });
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const s = collector(server);
    collector(client);
    client.send(Buffer.from('x'));
    await until(() => realIndex !== 0 && s.got.length === 1, 2000, 'a real record');
    const random = seededRandom(42);
    const shapes: Array<() => Buffer> = [
      () => Buffer.alloc(0),
      () => randomBytes(1 + Math.floor(random() * 1400)),
      () => Buffer.concat([Buffer.from([1]), randomBytes(100 + Math.floor(random() * 300))]), // initiation-shaped
      () => Buffer.concat([Buffer.from([2]), randomBytes(80)]),
      () => Buffer.concat([Buffer.from([4]), randomBytes(40 + Math.floor(random() * 1000))]), // a random index
      () => {
        const forged = Buffer.concat([Buffer.from([4]), randomBytes(60)]);
        forged.writeUInt32LE(realIndex, 1); // the live index with a forged tag
        return forged;
      },
      () => Buffer.from([4, 0, 0, 0]),
    ];
    const serverSentBefore = serverEnd.sent.count;
    for (let i = 0; i < 3000; i++) attacker.send(shapes[i % shapes.length]!(), SERVER);
    await sleep(200);
    assert.is(serverEnd.sent.to.get(attackerAddress) ?? 0, 0, 'not one datagram to the attacker');
    assert.is(serverEnd.sent.count, serverSentBefore, 'nothing sent because of the garbage');
    assert.ok(served.refused.length >= 1, 'initiation-shaped garbage is reported');
    assert.ok(served.refused.length <= 25, `refusals are rate-limited (${served.refused.length} reported)`);
    assert.ok(served.refused.every((r) => r.remote === attackerAddress));
    assert.is(served.acceptor.halfOpen, 0, 'no half-open state for garbage');
    assert.is(s.got.length, 1, 'nothing forged was delivered');
    // The good client is unaffected.
    client.send(Buffer.from('still here'));
    await until(() => s.got.some((p) => p.toString() === 'still here'), 2000, 'the good client after the garbage');
    assert.is(server.remoteAddress, CLIENT, 'garbage from elsewhere did not move the session');
    client.destroy();
  } finally {
    net.close();
  }
});

test('a replayed initiation gets no answer; a replayed record is not delivered twice', async () => {
  const w = world();
  const captured: Buffer[] = [];
  const { net, serverEnd, clientEnd, served } = setup(w, (d) => {
    if (d.from === CLIENT) captured.push(Buffer.from(d.data));
    return 'deliver';
  });
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const s = collector(server);
    collector(client);
    client.send(Buffer.from('once'));
    await until(() => s.got.length === 1, 2000, 'the record');
    const replayer = net.endpoint('203.0.113.9:9999');
    replayer.start({ datagram: () => assert.unreachable('answered a replay'), drain() {}, close() {} });
    const sentBefore = serverEnd.sent.count;
    for (const d of captured) replayer.send(d, SERVER);
    await sleep(100);
    assert.is(s.got.length, 1, 'the replayed record was dropped');
    assert.is(serverEnd.sent.count, sentBefore, 'no answer to anything replayed');
    assert.ok(served.refused.some((r) => r.reason === 'replayed initiation'));
    assert.is(server.remoteAddress, CLIENT, 'replays do not move the session');
    client.destroy();
  } finally {
    net.close();
  }
});

// ---------------------------------------------------------------------------
// roaming

test('roaming (in memory): the client\'s address changes mid-transfer; the server follows it', async () => {
  const w = world();
  const { net, serverEnd, clientEnd, served } = setup(w);
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const echoed = new Set<number>();
    collector(client, (p) => echoed.add(p.readUInt32BE(0)));
    collector(server, (p) => server.send(p)); // echo
    const n = 400;
    const moved = '198.51.100.7:40999';
    for (let round = 0; echoed.size < n && round < 50; round++) {
      for (let i = 0; i < n; i++) {
        if (!echoed.has(i)) client.send(numbered(i));
        if (round === 0 && i === n / 2) {
          await sleep(20);
          net.move(clientEnd, moved); // NAT rebinding: the old address is gone
        }
      }
      await sleep(50);
    }
    assert.is(echoed.size, n, 'the transfer completed');
    assert.is(server.remoteAddress, moved, 'the server now sends to the new address');
    assert.ok((serverEnd.sent.to.get(moved) ?? 0) > 0);
    client.destroy();
  } finally {
    net.close();
  }
});

test('roaming over real UDP: a relay switches its source port mid-transfer; the transfer completes', async () => {
  const ctx = testContext();
  const udp = udpDef.create({ mtu: 1420, recvBufferSize: 1 << 20, sendBufferSize: 1 << 20, sendQueue: 1024, gso: true }, ctx) as DatagramTransportPlugin;
  const w = world();
  const serverEnd = await udp.bind('127.0.0.1:0');
  const served = serve(w, serverEnd);
  const serverPort = Number(serverEnd.localAddress.split(':')[1]);
  // The relay: the client talks to `front`; the relay talks to the server from `back`, which it replaces mid-transfer.
  const front = dgram.createSocket('udp4');
  const backs: dgram.Socket[] = [];
  let clientPort = 0;
  const newBack = async (): Promise<dgram.Socket> => {
    const back = dgram.createSocket('udp4');
    back.on('message', (msg) => front.send(msg, clientPort, '127.0.0.1'));
    await new Promise<void>((r) => back.bind(0, '127.0.0.1', () => r()));
    backs.push(back);
    return back;
  };
  let back = await newBack();
  front.on('message', (msg, rinfo) => {
    clientPort = rinfo.port;
    back.send(msg, serverPort, '127.0.0.1');
  });
  await new Promise<void>((r) => front.bind(0, '127.0.0.1', () => r()));
  let client: Session | undefined;
  try {
    const clientEnd = await udp.bind('127.0.0.1:0');
    client = await withTimeout(connectDatagramSession(clientEnd, `127.0.0.1:${front.address().port}`, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const firstBack = `127.0.0.1:${back.address().port}`;
    assert.is(server.remoteAddress, firstBack);
    const echoed = new Set<number>();
    collector(client, (p) => echoed.add(p.readUInt32BE(0)));
    collector(server, (p) => server.send(p));
    const n = 300;
    for (let round = 0; echoed.size < n && round < 40; round++) {
      for (let i = 0; i < n; i++) {
        if (!echoed.has(i)) client.send(numbered(i, 200));
        if (round === 0 && i === n / 2) {
          await sleep(30);
          const old = back;
          back = await newBack();
          old.close(); // the old mapping is gone: replies to it are lost
          backs.splice(backs.indexOf(old), 1);
        }
        if (i % 25 === 24) await sleep(1);
      }
      await sleep(100);
    }
    assert.is(echoed.size, n, 'the transfer completed');
    const secondBack = `127.0.0.1:${back.address().port}`;
    assert.is.not(secondBack, firstBack);
    assert.is(server.remoteAddress, secondBack, 'the server follows the new port');
  } finally {
    client?.destroy();
    await served.acceptor.close();
    serverEnd.close();
    front.close();
    for (const b of backs) b.close();
    await udp.close?.();
  }
});

// ---------------------------------------------------------------------------
// rekey, expiry, close

test('rekey under continuous traffic over a reordering network loses nothing', async () => {
  const w = world();
  const random = seededRandom(3);
  const { net, clientEnd, served } = setup(w, (d) => (isData(d) ? { delayMs: Math.floor(random() * 6) } : 'deliver'));
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w, { rekeyAfterMs: 150 })), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const c = collector(client);
    const s = collector(server);
    let sentUp = 0;
    let sentDown = 0;
    const end = Date.now() + 1300;
    while (Date.now() < end) {
      for (let i = 0; i < 10; i++) {
        client.send(numbered(sentUp++));
        server.send(numbered(sentDown++));
      }
      await sleep(3);
    }
    await until(() => s.got.length >= sentUp && c.got.length >= sentDown, 3000, 'every payload');
    assert.is(new Set(s.got.map((p) => p.readUInt32BE(0))).size, sentUp, 'client -> server: all, once');
    assert.is(new Set(c.got.map((p) => p.readUInt32BE(0))).size, sentDown, 'server -> client: all, once');
    assert.ok(c.rekeys >= 4 && s.rekeys >= 4, `rekeyed repeatedly (client ${c.rekeys}, server ${s.rekeys})`);
    client.destroy();
  } finally {
    net.close();
  }
});

test('rekey over a lossy network: rekeys complete, and only what the network dropped is missing', async () => {
  const w = world();
  const random = seededRandom(11);
  let droppedUp = 0;
  const { net, clientEnd, served } = setup(w, (d) => {
    if (!isData(d) || random() >= 0.1) return 'deliver';
    if (d.from === CLIENT) droppedUp++;
    return 'drop';
  });
  try {
    // The handshake itself may lose datagrams here: it retransmits.
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w, { rekeyAfterMs: 150 })), 8000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    collector(client);
    const s = collector(server);
    droppedUp = 0;
    let sent = 0;
    const end = Date.now() + 1300;
    while (Date.now() < end) {
      for (let i = 0; i < 10; i++) client.send(numbered(sent++));
      await sleep(3);
    }
    await sleep(200);
    const got = new Set(s.got.map((p) => p.readUInt32BE(0)));
    assert.is(got.size, s.got.length, 'nothing delivered twice');
    assert.ok(got.size >= sent - droppedUp, `missing ${sent - got.size}, the network dropped ${droppedUp} client records`);
    assert.ok(got.size > sent * 0.8);
    assert.ok(s.rekeys >= 3, `rekeys completed despite loss (${s.rekeys})`);
    client.destroy();
  } finally {
    net.close();
  }
});

test('a silent peer: the session expires after idleTimeoutMs with TUNNEL_DOWN, and its state is released', async () => {
  const w = world();
  let cut = false;
  const { net, clientEnd, served } = setup(w, (d) => (cut ? 'drop' : 'deliver'), { idleTimeoutMs: 300 });
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const s = collector(server);
    collector(client);
    cut = true;
    const err = await withTimeout(s.closed, 3000, 'expiry');
    assert.instance(err, DshieldError);
    assert.is((err as DshieldError).code, ErrorCodes.TUNNEL_DOWN);
    assert.match(err!.message, /expired/);
    assert.is(served.acceptor.sessions, 0);
    client.destroy();
  } finally {
    net.close();
  }
});

test('the server closing: the client sees a clean close; the acceptor closes the endpoint once its sessions are gone', async () => {
  const w = world();
  const { net, serverEnd, clientEnd, served } = setup(w);
  try {
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 3000, 'handshake');
    const server = await withTimeout(served.firstSession, 3000, 'server session');
    const c = collector(client);
    collector(server);
    await served.acceptor.close();
    assert.not.ok(serverEnd.closed, 'the endpoint stays while a session lives');
    server.close();
    assert.is(await withTimeout(c.closed, 2000, 'client close'), undefined);
    assert.ok(serverEnd.closed, 'the endpoint closed with the last session');
    assert.ok(clientEnd.closed);
  } finally {
    net.close();
  }
});

test('after close() stops accepting, initiations get no answer', async () => {
  const w = world();
  const { net, serverEnd, clientEnd, served } = setup(w);
  try {
    await served.acceptor.close();
    await expectReject(
      connectDatagramSession(clientEnd, SERVER, clientOpts(w, { handshakeTimeoutMs: 300 })),
      ErrorCodes.HANDSHAKE_TIMEOUT,
      'no longer accepting',
    );
    assert.is(serverEnd.sent.count, 0);
  } finally {
    net.close();
  }
});

/**
 * `count` authentic initiation datagrams, each from a client key of its own
 * (authorized in `w`), so the replay guard never stands between an
 * initiation and its answer: what goes unanswered was rate-limited.
 */
function initiations(w: World, count: number): Buffer[] {
  return Array.from({ length: count }, (_, i) => {
    const staticKey = generateKeyPair();
    w.clients.set(staticKey.publicKey.toString('base64'), { name: `c${i}` });
    const message1 = writeInitiation(initiatorFactory({ cipher: chacha, hash: 'BLAKE2s', staticKey, serverPublicKey: w.server.publicKey })(), {});
    const datagram = Buffer.alloc(5 + message1.length);
    datagram[0] = 1;
    datagram.writeUInt32LE(i + 1, 1);
    message1.copy(datagram, 5);
    return datagram;
  });
}

/** Sends each datagram of `batch` from `from` and waits until the server sends no more; returns how many it sent to `from`. */
async function answered(net: DatagramNet, serverEnd: MemEndpoint, from: string, batch: Buffer[]): Promise<number> {
  const source = net.endpoint(from);
  source.start({ datagram() {}, drain() {}, close() {} });
  for (const datagram of batch) source.send(datagram, SERVER);
  let seen = -1;
  await until(
    () => {
      const now = serverEnd.sent.count;
      const settled = now === seen;
      seen = now;
      return settled;
    },
    5000,
    'the server to settle',
  );
  return serverEnd.sent.to.get(from) ?? 0;
}

test('handshake rate limits: per source IP and overall, the defaults and configured ones; a limited client is answered once it resends later', async () => {
  // Defaults: 20 a second from one IP, in bursts of up to 40.
  {
    const w = world();
    const { net, serverEnd } = setup(w);
    try {
      const n = await answered(net, serverEnd, '203.0.113.1:1000', initiations(w, 50));
      assert.ok(n >= 40 && n <= 41, `default per-source burst: ${n} of 50 answered, expected 40`);
    } finally {
      net.close();
    }
  }
  // Configured: 3 a second from one IP (bursts of 6), 10 a second overall (bursts of 10).
  const w = world();
  let clientTries = 0;
  const count = (d: InFlight): Fate => {
    if (d.from === CLIENT && isInitiation(d)) clientTries++;
    return 'deliver';
  };
  const warnings: string[] = [];
  const log: Logger = { ...quiet, warn: (msg) => warnings.push(msg), child: () => log };
  const { net, serverEnd, clientEnd, served } = setup(w, count, { handshakesPerSource: 3, handshakesPerSecond: 10, log, rateLimitWarningMs: 400 });
  try {
    const first = await answered(net, serverEnd, '203.0.113.1:1000', initiations(w, 12));
    assert.ok(first >= 6 && first <= 7, `per-source burst: ${first} of 12 answered, expected 6`);
    // The first initiation turned away is reported at once, with the setting to raise; the rest wait for the next warning.
    assert.equal(warnings, [
      'handshake rate limits turned away an initiation: 1 over server.handshakesPerSource (3 a second from one IP, latest 203.0.113.1). ' +
        'Their clients retry; if they are yours (many behind one NAT, or all reconnecting at once), raise the setting',
    ]);
    // Another port on the same IP shares its bucket.
    const samePort = await answered(net, serverEnd, '203.0.113.1:2000', initiations(w, 3));
    assert.ok(samePort <= 1, `the same IP from another port: ${samePort} answered`);
    // Other IPs have buckets of their own, until the overall limit (10, of which ~6 are spent) stops them too.
    let others = 0;
    for (let ip = 2; ip <= 4; ip++) others += await answered(net, serverEnd, `203.0.113.${ip}:1000`, initiations(w, 3));
    assert.ok(others >= 3 && others <= 5, `other sources within the overall limit: ${others} answered, expected 4`);
    assert.ok(first + samePort + others <= 12, `overall: ${first + samePort + others} answered in the burst`);
    assert.is(warnings.length, 1, 'one warning per interval, however many are turned away');
    // Empty the overall bucket, then a real client: its first initiation goes unanswered, a resent one is answered.
    await sleep(450);
    await answered(net, serverEnd, '203.0.113.5:1000', initiations(w, 6));
    // The next warning counts everything turned away since the first, by limit.
    assert.is(warnings.length, 2);
    assert.match(warnings[1]!, /^handshake rate limits turned away \d+ initiations in \d+ s: \d+ over server\.handshakesPerSource \(3 a second from one IP, latest 203\.0\.113\.\d\); \d+ over server\.handshakesPerSecond \(10 a second in all\)\. /);
    const client = await withTimeout(connectDatagramSession(clientEnd, SERVER, clientOpts(w)), 6000, 'handshake after the limit');
    await withTimeout(served.firstSession, 3000, 'server session');
    assert.ok(clientTries >= 2, `the client was answered only after resending (${clientTries} initiations)`);
    client.destroy();
  } finally {
    net.close();
  }
});

test('respond() throwing refuses with silence; IKpsk2 works over datagrams', async () => {
  const w = world();
  const refusing = setup(w, undefined, {
    respond: () => {
      throw new DshieldError(ErrorCodes.TUN, 'address pool exhausted');
    },
  });
  try {
    await expectReject(
      connectDatagramSession(refusing.clientEnd, SERVER, clientOpts(w, { handshakeTimeoutMs: 300 })),
      ErrorCodes.HANDSHAKE_TIMEOUT,
      'refused',
    );
    assert.is(refusing.serverEnd.sent.count, 0);
    assert.equal(refusing.served.refused[0]?.reason, 'refused: address pool exhausted');
  } finally {
    refusing.net.close();
  }
  const psk = randomBytes(32);
  const pw = world(psk);
  const withPsk = setup(pw);
  try {
    const client = await withTimeout(connectDatagramSession(withPsk.clientEnd, SERVER, clientOpts(pw, { psk })), 3000, 'psk handshake');
    assert.equal(client.params, { hello: 'alice', echo: { want: 'udp' } });
    client.destroy();
  } finally {
    withPsk.net.close();
  }
});

test.run();
