/**
 * End to end on loopback, with the real CLI and real curl: a server process,
 * a client process, a real HTTP server as the destination.
 *
 * For each transport (tcp, ws) and cipher (chacha20-poly1305, aes-256-gcm):
 * a 50 MB download and a 50 MB upload through SOCKS5 (--socks5-hostname) and
 * through the HTTP proxy, SHA-256 equal on both sides.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stopAll, tempDir } from './helpers/cli.ts';
import { curl } from './helpers/curl.ts';
import { startTunnel } from './helpers/tunnel.ts';
import { sha256, startWebServer, type WebServer } from './helpers/web.ts';

const SIZE = 50 * 1024 * 1024;
const payload = randomBytes(SIZE);
const payloadHash = sha256(payload);

let web: WebServer;
const tmp = tempDir();
const payloadFile = join(tmp.dir, 'payload.bin');

test.before(async () => {
  writeFileSync(payloadFile, payload);
  web = await startWebServer(payload);
});

test.after(async () => {
  await stopAll();
  await web?.close();
  tmp.cleanup();
});

for (const transport of ['tcp', 'ws']) {
  for (const cipher of ['chacha20-poly1305', 'aes-256-gcm']) {
    test(`50 MB down and up through SOCKS5 and HTTP proxy: ${transport} + ${cipher}`, async () => {
      const t = await startTunnel({ transport, cipher });
      try {
        const out = join(tmp.dir, `down-${transport}-${cipher}.bin`);

        await curl(['--socks5-hostname', t.socks, web.url('/download'), '-o', out]);
        assert.is(sha256(readFileSync(out)), payloadHash, 'SOCKS5 download: SHA-256 differs');
        const up1 = await curl(['--socks5-hostname', t.socks, '-T', payloadFile, web.url('/upload')]);
        assert.is(up1, `${payloadHash} ${SIZE}`, 'SOCKS5 upload: SHA-256 differs');

        await curl(['--proxy', t.http, web.url('/download'), '-o', out]);
        assert.is(sha256(readFileSync(out)), payloadHash, 'HTTP proxy download: SHA-256 differs');
        const up2 = await curl(['--proxy', t.http, '-T', payloadFile, web.url('/upload')]);
        assert.is(up2, `${payloadHash} ${SIZE}`, 'HTTP proxy upload: SHA-256 differs');

        // CONNECT through the HTTP proxy (what browsers do for https).
        const small = await curl(['--proxytunnel', '--proxy', t.http, web.url('/hello')]);
        assert.is(small, 'hello through the tunnel\n');
      } finally {
        await t.close();
      }
    });
  }
}

test('the destination sees the server side of the tunnel, not the client', async () => {
  const t = await startTunnel();
  try {
    const who = await curl(['--socks5-hostname', t.socks, web.url('/whoami')]);
    // On one machine both ends are 127.0.0.1, so prove it by the owner of the socket.
    const serverPid = t.server.child.pid!;
    const clientPid = t.client.child.pid!;
    assert.match(who, new RegExp(`pid=${serverPid}\\b`), `the web server's peer is the dshield server process: ${who}`);
    assert.not.match(who, new RegExp(`pid=${clientPid}\\b`));
  } finally {
    await t.close();
  }
});

test.run();
