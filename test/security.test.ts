/**
 * What a man in the middle, a scanner and an unknown client see, with the
 * real CLI on loopback: ciphertext only, and silence.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { connect } from 'node:net';
import dgram from 'node:dgram';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stopAll, tempDir } from './helpers/cli.ts';
import { curl } from './helpers/curl.ts';
import { startRelay, type Relay } from './helpers/relay.ts';
import { startClientProc, startServerProc, startTunnel } from './helpers/tunnel.ts';
import { socksConnect } from './helpers/socks.ts';
import { withTimeout } from './helpers/timeout.ts';
import { startWebServer, sha256, type WebServer } from './helpers/web.ts';
import { generateKeyPair } from '../core/x25519.ts';
import { initiatorFactory, writeInitiation } from '../core/handshake.ts';
import { decodeKey } from '../core/keys.ts';
import { staticKeyFrom } from '../core/runtime.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';
import type { CipherPlugin } from '../core/types.ts';

const MARKER = 'PLAINTEXT-MARKER-7f3a9c-visible-only-inside-the-tunnel';
const payload = Buffer.from(`${MARKER}\n`.repeat(40_000)); // ~2.2 MB of a recognisable plaintext
let web: WebServer;
const tmp = tempDir();
const relays: Relay[] = [];

function hostPort(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  return { host: address.slice(0, i).replace(/^\[|\]$/g, ''), port: Number(address.slice(i + 1)) };
}

async function relayTo(address: string): Promise<Relay> {
  const relay = await startRelay(hostPort(address));
  relays.push(relay);
  return relay;
}

/** Resolves with every byte the socket receives within `ms`. */
function collectFor(socket: import('node:net').Socket, ms: number): Promise<Buffer> {
  return new Promise((resolve) => {
    const got: Buffer[] = [];
    socket.on('data', (c: Buffer) => got.push(c));
    socket.on('error', () => {});
    setTimeout(() => resolve(Buffer.concat(got)), ms);
  });
}

test.before(async () => {
  web = await startWebServer(payload);
});

test.after(async () => {
  await stopAll();
  for (const r of relays) await r.close();
  await web?.close();
  tmp.cleanup();
});

for (const transport of ['tcp', 'ws']) {
  test(`${transport}: the bytes between client and server never contain the plaintext`, async () => {
    let relay: Relay | undefined;
    const t = await startTunnel({
      transport,
      via: async (address) => {
        relay = await relayTo(address);
        return `127.0.0.1:${relay.port}`;
      },
    });
    try {
      const down = await curl(['--socks5-hostname', t.socks, web.url(`/download?${MARKER}`)]);
      assert.is(sha256(down), sha256(payload), 'the download arrived intact');
      const upFile = join(tmp.dir, 'up.txt');
      writeFileSync(upFile, payload);
      const up = await curl(['--proxy', t.http, '-T', upFile, web.url('/upload')]);
      assert.is(up, `${sha256(payload)} ${payload.length}`);

      const { toServer, toClient } = relay!.total();
      assert.ok(toServer > payload.length && toClient > payload.length, `the relay carried the traffic (${toServer}, ${toClient} bytes)`);
      const seen = Buffer.concat([...relay!.toServer, ...relay!.toClient]);
      assert.is(seen.indexOf(MARKER), -1, 'plaintext marker visible on the wire');
      assert.is(seen.indexOf(Buffer.from(MARKER.slice(0, 16))), -1, 'part of the plaintext visible on the wire');
      // (ws's HTTP upgrade names the relay's own 127.0.0.1 in its Host header, so only tcp can check this.)
      if (transport === 'tcp') assert.is(seen.indexOf('127.0.0.1'), -1, 'the destination address is visible on the wire');
    } finally {
      await t.close();
    }
  });
}

test('wrong pinned server key: the client refuses with a clear error', async () => {
  const s = await startServerProc();
  try {
    const wrong = generateKeyPair().publicKey.toString('base64');
    const client = startClientProc(s.config, s.serverAddress, ['--set', `client.serverPublicKey=${wrong}`]);
    const code = await client.exited(20_000);
    assert.is(code, 1);
    assert.match(client.output(), /man in the middle/);
    assert.not.match(client.output(), /\n\s+at /, 'no stack trace');
  } finally {
    await s.server.stop();
    s.cleanup();
  }
});

test('unknown client key: the server sends nothing at all', async () => {
  const s = await startServerProc();
  try {
    const relay = await relayTo(s.serverAddress);
    const stranger = generateKeyPair().privateKey.toString('base64');
    const client = startClientProc(s.config, `127.0.0.1:${relay.port}`, ['--set', `client.privateKey=${stranger}`]);
    const code = await client.exited(20_000);
    assert.is(code, 1);
    assert.match(client.output(), /DSHIELD_ERR_HANDSHAKE_TIMEOUT/);
    assert.ok(relay.total().toServer > 0, 'the client did send its initiation');
    assert.is(relay.total().toClient, 0, 'the server answered an unknown client');
    // The refusal is reported (at debug) with the address it came from: the relay's, on loopback.
    await s.server.waitFor(/silenced a connection from 127\.0\.0\.1:\d+: unknown client key/, 5000);
  } finally {
    await s.server.stop();
    s.cleanup();
  }
});

test('random bytes to the server port: no reply, no crash, good clients still served', async () => {
  const t = await startTunnel();
  try {
    const { host, port } = hostPort(t.serverAddress);
    const scans = [64, 4096, 300_000].map(async (size) => {
      const sock = connect(port, host);
      await new Promise((r) => sock.once('connect', r));
      sock.write(randomBytes(size));
      const got = await collectFor(sock, 1500);
      sock.destroy();
      return got.length;
    });
    assert.equal(await Promise.all(scans), [0, 0, 0], 'the server replied to garbage');
    assert.is(t.server.child.exitCode, null, 'the server is still running');
    const page = await curl(['--socks5-hostname', t.socks, web.url('/hello')]);
    assert.is(page, 'hello through the tunnel\n');
  } finally {
    await t.close();
  }
});

test('udp: initiations beyond server.handshakesPerSource from one address get no answer, and the refusal is logged', async () => {
  const s = await startServerProc({ transport: 'udp', http: false, serverArgs: ['--set', 'server.handshakesPerSource=1'] });
  const sock = dgram.createSocket('udp4');
  try {
    const staticKey = staticKeyFrom(readFileSync(join(s.dir, 'keys', 'client.key'), 'utf8').trim(), 'client.key');
    const serverPublicKey = decodeKey(readFileSync(join(s.dir, 'keys', 'server.pub'), 'utf8').trim(), 'server.pub');
    const cipher = chachaDef.create({}, undefined as never) as CipherPlugin;
    const make = initiatorFactory({ cipher, hash: 'BLAKE2s', staticKey, serverPublicKey });
    // Authentic initiations from the server's own client, each newer than the one before (no replays).
    const initiations = Array.from({ length: 6 }, (_, i) => {
      const message1 = writeInitiation(make(), {});
      return Buffer.concat([Buffer.from([1, i + 1, 0, 0, 0]), message1]);
    });
    let answers = 0;
    sock.on('message', (m) => {
      if (m[0] === 2) answers++;
    });
    await new Promise<void>((resolve) => sock.bind(0, '127.0.0.1', resolve));
    const { host, port } = hostPort(s.serverAddress);
    for (const datagram of initiations) sock.send(datagram, port, host);
    await s.server.waitFor(/silenced a connection from 127\.0\.0\.1:\d+: too many handshakes/, 5000);
    // Refusals are debug lines; that the limit is what turned clients away is a warning naming the setting.
    await s.server.waitFor(/WARN.*handshake rate limits turned away an initiation: 1 over server\.handshakesPerSource \(1 a second from one IP, latest 127\.0\.0\.1\)/, 5000);
    await new Promise((r) => setTimeout(r, 500));
    // A burst of up to twice the rate: 2 of the 6 (a third only if a token came back in between).
    assert.ok(answers >= 2 && answers <= 3, `${answers} of 6 initiations answered`);
  } finally {
    sock.close();
    await s.server.stop();
    s.cleanup();
  }
});

/** The client's SOCKS5 proxy with its reply held until the server has dialed (earlyReply off), so the reply carries the reason. */
const REPLY_AFTER_DIAL = ['--set', `client.socks=${JSON.stringify({ listen: '127.0.0.1:0', earlyReply: false })}`];

test('egress: 127.0.0.1 is refused by default (SOCKS reply 0x02, with earlyReply false)', async () => {
  const t = await startTunnel({ allow: [], clientArgs: REPLY_AFTER_DIAL });
  try {
    const { reply, socket } = await socksConnect(Number(t.socks.split(':')[1]), '127.0.0.1', web.port);
    socket.destroy();
    assert.is(reply, 0x02);
    const { reply: viaName, socket: s2 } = await socksConnect(Number(t.socks.split(':')[1]), 'localhost', web.port);
    s2.destroy();
    assert.is(viaName, 0x02, 'a name that resolves to loopback is refused too');
  } finally {
    await t.close();
  }
});

test('egress, with the early SOCKS5 reply (the default): a refused destination closes the connection, and nothing reaches it', async () => {
  const t = await startTunnel({ allow: [] });
  try {
    const before = web.seen.length;
    const { reply, socket } = await socksConnect(Number(t.socks.split(':')[1]), '127.0.0.1', web.port);
    assert.is(reply, 0x00, 'answered before the server could refuse');
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    const got = collectFor(socket, 3000);
    socket.write(`GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
    await withTimeout(closed, 5000, 'the proxy closes the refused connection');
    assert.not.match((await got).toString('latin1'), /HTTP\//, 'no answer came back');
    assert.is(web.seen.length, before, 'the early request never reached the destination');
    await t.client.waitFor(/stream failed.*DSHIELD_ERR_EGRESS_DENIED/, 5000);
  } finally {
    await t.close();
  }
});

test('egress: 127.0.0.1 is allowed when server.egress.allow includes it', async () => {
  const t = await startTunnel({ allow: ['127.0.0.1/32'] });
  try {
    const { reply, socket } = await socksConnect(Number(t.socks.split(':')[1]), '127.0.0.1', web.port);
    socket.destroy();
    assert.is(reply, 0x00);
  } finally {
    await t.close();
  }
});

test.run();
