/**
 * core/datapath/ (through Session.offloadPackets): a datagram session over
 * the udp transport on 127.0.0.1 whose packets take the packet thread. A
 * datagram socketpair stands in for the TUN (one packet per read and
 * write, as a TUN fd), so the test sees exactly what the thread writes and
 * gives it packets to read, without a device.
 *
 * What must hold: PACKET records are written into the "TUN" by the thread
 * and never reach handlers.message; everything else still does; packets
 * the thread reads from the "TUN" reach the peer sealed under the session's
 * keys, interleaved with the main thread's own records (one shared counter:
 * none is refused as a replay); a packet the thread cannot send goes to
 * readBack; the reading lent to the thread is given back when it stops; a
 * thread whose AEAD does not open what it seals takes no traffic; before it
 * takes any, the thread sends packets of its own through its path (its
 * warm-up), and they show in no counter main reads.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { encodeFrame, FrameType } from '../core/mux.ts';
import { ReplayGuard, type Session } from '../core/session.ts';
import { acceptDatagramSessions, connectDatagramSession } from '../core/session-datagram.ts';
import { CTRL_SLOTS, READER_MAIN, CTRL_READER } from '../core/tun/pump-protocol.ts';
import { createWakeFd } from '../core/tun/queue-io.ts';
import { VNET_HDR_LEN } from '../core/tun/tcp-coalesce.ts';
import { AF_UNIX, SOCK_CLOEXEC, SOCK_DGRAM, SOCK_NONBLOCK, libc } from '../core/tun/libc.ts';
import type { AuthPlugin, CipherPlugin, DatagramTransportPlugin, Logger, TunReaderHooks } from '../core/types.ts';
import { generateKeyPair } from '../core/x25519.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';
import aesDef from '../plugins/cipher-aes-256-gcm.ts';
import udpDef from '../plugins/transport-udp.ts';
import { silentLogger, testContext } from './helpers/context.ts';
import { withTimeout } from './helpers/timeout.ts';

/** A non-blocking datagram socketpair: [the thread's "TUN" fd, the test's end]. */
function socketpair(): [number, number] {
  const sv = new Int32Array(2);
  if (libc().socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) !== 0) throw new Error('socketpair failed');
  return [sv[0]!, sv[1]!];
}

/** An IPv4 packet (header and payload; only the fields the thread looks at are meaningful). */
function ipv4(src: string, dst: string, payload: Buffer): Buffer {
  const p = Buffer.alloc(20 + payload.length);
  p[0] = 0x45;
  p.writeUInt16BE(p.length, 2);
  p[8] = 64;
  p[9] = 17;
  Buffer.from(src.split('.').map(Number)).copy(p, 12);
  Buffer.from(dst.split('.').map(Number)).copy(p, 16);
  payload.copy(p, 20);
  return p;
}

/** Put `packet` into the "TUN" as the kernel would: behind a vnet header that asks nothing (the device has IFF_VNET_HDR). */
function writePacket(fd: number, packet: Buffer): void {
  const frame = Buffer.concat([Buffer.alloc(VNET_HDR_LEN), packet]);
  libc().write(fd, frame, frame.length);
}

/** The next packet on `fd` (non-blocking), polled for up to `ms`, without its vnet header (which must ask nothing of the kernel). */
async function readPacket(fd: number, ms: number): Promise<Buffer> {
  const buf = Buffer.alloc(65536);
  const deadline = Date.now() + ms;
  for (;;) {
    const n = libc().read(fd, buf, buf.length);
    if (n > 0) {
      assert.equal(buf.subarray(0, VNET_HDR_LEN), Buffer.alloc(VNET_HDR_LEN), 'a lone packet is written behind an empty vnet header');
      return Buffer.from(buf.subarray(VNET_HDR_LEN, n));
    }
    if (Date.now() > deadline) throw new Error(`no packet within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

interface Pair {
  client: Session;
  server: Session;
  toClient: Buffer[];
  toServer: Buffer[];
  close(): Promise<void>;
}

async function sessionPair(cipher: CipherPlugin, log: Logger = silentLogger()): Promise<Pair> {
  const udp = udpDef.create({ mtu: 1420, recvBufferSize: 1 << 20, sendBufferSize: 1 << 20, sendQueue: 1024, gso: true }, testContext()) as DatagramTransportPlugin;
  const serverKeys = generateKeyPair();
  const clientKeys = generateKeyPair();
  const auth: AuthPlugin = {
    name: 'test',
    authorize: (key) => (key.equals(clientKeys.publicKey) ? { name: 'alice', publicKey: key.toString('base64') } : null),
    psk: () => undefined,
  };
  let gotServer!: (s: Session) => void;
  const serverSession = new Promise<Session>((r) => (gotServer = r));
  const acceptor = acceptDatagramSessions(await udp.bind('127.0.0.1:0'), {
    cipher,
    hash: 'BLAKE2s',
    staticKey: serverKeys,
    auth,
    replay: new ReplayGuard(),
    handshakeTimeoutMs: 3000,
    log,
    respond: () => ({}),
    onSession: (s) => gotServer(s),
    onRefused() {},
  });
  const client = await connectDatagramSession(await udp.bind('127.0.0.1:0'), acceptor.address, {
    cipher,
    hash: 'BLAKE2s',
    staticKey: clientKeys,
    serverPublicKey: serverKeys.publicKey,
    handshakeTimeoutMs: 3000,
    log,
  });
  const server = await withTimeout(serverSession, 3000, 'the server session');
  const toClient: Buffer[] = [];
  const toServer: Buffer[] = [];
  const handlers = (into: Buffer[]) => ({ message: (p: Buffer) => into.push(Buffer.from(p)), drain() {}, close() {} });
  client.start(handlers(toClient));
  server.start(handlers(toServer));
  return {
    client,
    server,
    toClient,
    toServer,
    async close() {
      client.close();
      server.close();
      await acceptor.close();
    },
  };
}

for (const [name, def] of [
  ['chacha20-poly1305', chachaDef],
  ['aes-256-gcm', aesDef],
] as const) {
  test(`${name}: packets take the packet thread both ways; everything else takes the main thread`, async () => {
    const cipher = def.create({}, undefined as never) as CipherPlugin;
    assert.ok(cipher.thread, 'the built-in cipher says how a thread makes it');
    const stopped: Array<Record<string, unknown> | undefined> = [];
    const log: Logger = { ...silentLogger(), debug: (msg, fields) => void (msg === 'udp packet thread stopped' && stopped.push(fields)), child: () => log };
    const pair = await sessionPair(cipher, log);
    const [tunFd, testFd] = socketpair();
    const ctrl = new SharedArrayBuffer(CTRL_SLOTS * 4);
    Atomics.store(new Int32Array(ctrl), CTRL_READER, READER_MAIN);
    const pumpWakeFd = createWakeFd();
    let lentTo: TunReaderHooks | undefined;
    let givenBack = false;
    const readBack: Buffer[] = [];
    try {
      const stop = pair.client.offloadPackets?.({
        fd: tunFd,
        maxPacket: 1420,
        readBack: (p) => readBack.push(Buffer.from(p)),
        lendReader: (hooks) => {
          lentTo = hooks;
          return { fd: tunFd, ctrl, pumpWakeFd, giveBack: () => (givenBack = true) };
        },
      });
      assert.type(stop, 'function', 'the session offloads');
      assert.is(lentTo, undefined, 'the reading is not borrowed before the thread runs');
      // The device goes on reading until the thread runs; then the thread borrows the reading.
      await until('the reading borrowed once the thread runs', () => lentTo !== undefined, 10_000);

      // Server -> client: a PACKET record goes into the "TUN", not to handlers.message.
      const inbound = ipv4('203.0.113.5', '10.66.0.2', Buffer.from('to the client'));
      // The thread starts asynchronously; until it reads, records take the main thread (as before it).
      let written: Buffer | undefined;
      const deadline = Date.now() + 5000;
      while (written === undefined && Date.now() < deadline) {
        pair.server.send(encodeFrame(FrameType.PACKET, 0, inbound));
        written = await readPacket(testFd, 200).catch(() => undefined);
      }
      assert.ok(written, 'a packet reached the "TUN" from the thread');
      assert.equal(written, inbound);
      // One at a time, as a ping's: a burst (16 in a millisecond) would go to the main thread's batched path.
      const messagesBefore = pair.toClient.length;
      for (let i = 0; i < 20; i++) {
        pair.server.send(encodeFrame(FrameType.PACKET, 0, inbound));
        assert.equal(await readPacket(testFd, 2000), inbound, `packet ${i}`);
        await new Promise((r) => setTimeout(r, 2));
      }
      assert.is(pair.toClient.length, messagesBefore, 'none of them reached handlers.message');

      // Anything but PACKET frames still takes the main thread.
      const ping = encodeFrame(FrameType.PING, 0, Buffer.alloc(8, 7));
      pair.server.send(ping);
      await until('the PING frame on the main thread', () => pair.toClient.some((m) => m.equals(ping)));

      // Client "TUN" -> server: the thread reads it, seals it under the session's keys, sends it.
      // Main's own records go on under the same keys: one shared counter, so none is refused as a replay.
      const outbound = ipv4('10.66.0.2', '203.0.113.5', Buffer.from('from the client'));
      const frame = encodeFrame(FrameType.PACKET, 0, outbound);
      for (let i = 0; i < 10; i++) {
        writePacket(testFd, outbound);
        await until(`packet ${i} at the server`, () => pair.toServer.filter((m) => m.equals(frame)).length === i + 1);
        const own = Buffer.from(`main ${i}`);
        pair.client.send(own);
        await until(`main's record ${i} at the server`, () => pair.toServer.some((m) => m.equals(own)));
      }
      assert.is(readBack.length, 0, 'the thread sent them all itself');
      assert.ok(pair.client.bytesOut > 0);

      // Reading stops on request (the device is closing): nothing more is read from the "TUN".
      lentTo!.revoke();
      await new Promise((r) => setTimeout(r, 50));
      writePacket(testFd, outbound);
      await new Promise((r) => setTimeout(r, 200));
      assert.is(pair.toServer.filter((m) => m.equals(frame)).length, 10, 'not read after revoke');
    } finally {
      await pair.close();
      await until('the reading given back when the thread stopped', () => givenBack, 3000).catch(() => undefined);
      libc().close(testFd);
      libc().close(tunFd);
      libc().close(pumpWakeFd);
    }
    // Revoked before: nothing to give back then. The session's end stops the thread either way.
    assert.not.ok(givenBack, 'a revoked loan is not given back');
    // Before it took traffic, the thread sent lone packets of its own through its whole path, on
    // loopback and a socketpair of its own; the counters main reads count only the session's records.
    assert.is(stopped.length, 1, 'the thread stopped once');
    const { warmUp, received, opened } = stopped[0] as { warmUp: { rounds: number; ms: number }; received: number; opened: number };
    assert.ok(warmUp.rounds >= 100, `the warm-up went round its circuit (${warmUp.rounds} rounds in ${warmUp.ms.toFixed(0)} ms)`);
    assert.ok(received >= 21 && received < 100, `received counts the session's datagrams only: ${received}`);
    assert.ok(opened >= 21 && opened <= received, `opened counts the session's records only: ${opened}`);
  });
}

test('a packet the thread reads but cannot route goes to readBack', async () => {
  const cipher = chachaDef.create({}, undefined as never) as CipherPlugin;
  const pair = await sessionPair(cipher);
  const [tunFd, testFd] = socketpair();
  const ctrl = new SharedArrayBuffer(CTRL_SLOTS * 4);
  const pumpWakeFd = createWakeFd();
  const readBack: Buffer[] = [];
  let givenBack = false;
  try {
    // A server-side sink: packets from the TUN are routed by destination, and only 10.66.0.2 is this session's.
    const stop = pair.server.offloadPackets?.({
      fd: tunFd,
      source4: '10.66.0.2',
      maxPacket: 1420,
      readBack: (p) => readBack.push(Buffer.from(p)),
      lendReader: () => ({ fd: tunFd, ctrl, pumpWakeFd, giveBack: () => (givenBack = true) }),
    });
    assert.type(stop, 'function');
    const elsewhere = ipv4('203.0.113.5', '10.66.0.9', Buffer.from('for nobody here'));
    const mine = ipv4('203.0.113.5', '10.66.0.2', Buffer.from('for alice'));
    // It waits in the "TUN" until the thread reads (one at a time: a burst would be handed to the pump).
    writePacket(testFd, elsewhere);
    await until('the unroutable packet in readBack', () => readBack.length > 0);
    assert.equal(readBack[0], elsewhere);
    writePacket(testFd, mine);
    const frame = encodeFrame(FrameType.PACKET, 0, mine);
    await until('the routed packet at the client', () => pair.toClient.some((m) => m.equals(frame)));
    stop!();
  } finally {
    await pair.close();
    await until('the reading given back', () => givenBack, 3000);
    libc().close(testFd);
    libc().close(tunFd);
    libc().close(pumpWakeFd);
  }
});

test("a thread whose AEAD does not open what it seals takes no traffic: the session's packets stay on the main thread", async () => {
  const real = chachaDef.create({}, undefined as never) as CipherPlugin;
  const cipher: CipherPlugin = { ...real, thread: { module: new URL('./fixtures/broken-aead.ts', import.meta.url).href, export: 'brokenAead' } };
  const warnings: string[] = [];
  const log: Logger = { ...silentLogger(), warn: (msg) => warnings.push(msg), child: () => log };
  const pair = await sessionPair(cipher, log);
  const [tunFd, testFd] = socketpair();
  const ctrl = new SharedArrayBuffer(CTRL_SLOTS * 4);
  Atomics.store(new Int32Array(ctrl), CTRL_READER, READER_MAIN);
  const pumpWakeFd = createWakeFd();
  let lent = false;
  try {
    const stop = pair.client.offloadPackets?.({
      fd: tunFd,
      maxPacket: 1420,
      lendReader: () => {
        lent = true;
        return { fd: tunFd, ctrl, pumpWakeFd, giveBack() {} };
      },
    });
    assert.type(stop, 'function', 'the session offloads (the thread checks its AEAD once it runs)');
    await until('the thread to stop on its check', () => warnings.some((w) => w.includes('does not open what it seals')), 10_000);
    assert.not.ok(lent, 'the TUN reading was never lent to it');
    const inbound = ipv4('203.0.113.5', '10.66.0.2', Buffer.from('to the client'));
    const frame = encodeFrame(FrameType.PACKET, 0, inbound);
    for (let i = 0; i < 5; i++) {
      pair.server.send(frame);
      await until(`packet ${i} on the main thread`, () => pair.toClient.filter((m) => m.equals(frame)).length === i + 1);
    }
    assert.is(libc().read(testFd, Buffer.alloc(2048), 2048), -1, 'nothing was written into the "TUN"');
  } finally {
    await pair.close();
    libc().close(testFd);
    libc().close(tunFd);
    libc().close(pumpWakeFd);
  }
});

test.run();
