/**
 * The life of a tunnel as a user sees it: `npm start`'s local mode and its
 * printed curl command, graceful shutdown with a stream in flight, session
 * logs on the server, and reconnection after the server restarts.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFile } from 'node:child_process';
import { runCli, startCli, stopAll, tempDir } from './helpers/cli.ts';
import { curl } from './helpers/curl.ts';
import { startClientProc, startServerProc, startTunnel } from './helpers/tunnel.ts';
import { SLOW_CHUNK, startWebServer, type WebServer } from './helpers/web.ts';

let web: WebServer;
test.before(async () => {
  web = await startWebServer(Buffer.from('payload'));
});
test.after(async () => {
  await stopAll();
  await web?.close();
});

test('local mode prints proxies and a curl command that fetches a page through the tunnel', async () => {
  const local = startCli(['--mode', 'local', '--set', 'client.socks="127.0.0.1:0"', '--set', 'client.http="127.0.0.1:0"']);
  try {
    await local.waitFor(/SOCKS5 proxy: socks5:\/\/127\.0\.0\.1:\d+/);
    await local.waitFor(/HTTP proxy: {3}http:\/\/127\.0\.0\.1:\d+/);
    const [socksLine] = await local.waitFor(/curl --socks5-hostname \S+ \S+/);
    const [httpLine] = await local.waitFor(/curl --proxy \S+ \S+/);
    for (const line of [socksLine, httpLine]) {
      const [cmd, ...args] = line.split(' ');
      const page = await new Promise<string>((resolve, reject) =>
        execFile(cmd!, ['-sS', '--max-time', '20', ...args], { timeout: 25_000 }, (err, out, errOut) => (err ? reject(new Error(errOut || err.message)) : resolve(out))),
      );
      assert.match(page, /fetched through the encrypted tunnel/);
    }
  } finally {
    await local.stop();
  }
});

test('SIGTERM: the server lets a stream in flight finish, logs the session, exits 0', async () => {
  const t = await startTunnel();
  try {
    const download = curl(['--socks5-hostname', t.socks, web.url('/slow')], 20_000);
    await new Promise((r) => setTimeout(r, 500)); // the stream is open and mid-transfer
    t.server.child.kill('SIGTERM');
    const body = await download;
    assert.is(body.length, SLOW_CHUNK * 10, 'the stream finished');
    assert.is(await t.server.exited(15_000), 0);
    assert.match(t.server.output(), /session down: e2e from 127\.0\.0\.1:\d+, [\d.]+ \w+ in, [\d.]+ \w+ out, [\d.]+ m?s/);
  } finally {
    await t.close();
  }
});

test('the client reconnects after the server restarts, and a new stream waits for it', async () => {
  const first = await startServerProc();
  const client = startClientProc(first.config, first.serverAddress, ['--set', 'client.connectWait=15000']);
  let second: Awaited<ReturnType<typeof startCli>> | undefined;
  try {
    const [, socks] = await client.waitFor(/proxy ready: socks5:\/\/(\S+)/);
    assert.is(await curl(['--socks5-hostname', socks!, web.url('/hello')], 10_000), 'hello through the tunnel\n');

    await first.server.stop();
    await client.waitFor(/reconnecting in/, 10_000);
    // A request made while the tunnel is down waits for it instead of failing.
    const waiting = curl(['--socks5-hostname', socks!, web.url('/hello')], 30_000);
    await new Promise((r) => setTimeout(r, 300));
    second = startCli(['--mode', 'server', '--config', first.config, '--set', `server.listen=${JSON.stringify(first.serverAddress)}`]);
    await second.waitFor(/listening on/);
    assert.is(await waiting, 'hello through the tunnel\n');
    assert.match(client.output(), /tunnel up/);
  } finally {
    await client.stop();
    await second?.stop();
    await first.server.stop();
    first.cleanup();
  }
});

test('invite while the server runs: the new client connects without a restart', async () => {
  const s = await startServerProc();
  const elsewhere = tempDir();
  try {
    const r = await runCli(['invite', 'laptop', '--config', s.config, '--address', s.serverAddress]);
    assert.is(r.code, 0, r.stderr);
    await s.server.waitFor(/reloaded .*clients\.json: 2 authorized clients/, 10_000);
    const client = startCli(
      ['--mode', 'client', '--invite', r.stdout.trim(), '--set', 'client.socks="127.0.0.1:0"', '--set', 'client.http=false'],
      { cwd: elsewhere.dir },
    );
    const [, socks] = await client.waitFor(/proxy ready: socks5:\/\/(\S+)/);
    assert.is(await curl(['--socks5-hostname', socks!, web.url('/hello')], 10_000), 'hello through the tunnel\n');
    assert.match(s.server.output(), /session up: laptop from/);
    await client.stop();
  } finally {
    await s.server.stop();
    s.cleanup();
    elsewhere.cleanup();
  }
});

test.run();
