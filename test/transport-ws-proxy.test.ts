/**
 * transport "ws" as a web server: behind a reverse proxy (a tiny one written
 * here: it forwards upgrades under /vpn/ to the dshield server, adding
 * X-Forwarded-For), answering everything else like a boring web server,
 * over wss:// with a self-signed certificate, and failing dials clearly.
 *
 *   npx tsx test/transport-ws-proxy.test.ts
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import WebSocket from 'ws';
import { isDshieldError } from '../core/errors.ts';
import type { Link, TransportListener, StreamTransportPlugin } from '../core/types.ts';
import wsPlugin from '../plugins/transport-ws.ts';
import { testContext } from './helpers/context.ts';
import { patterned, probeLink, sendAll, sleep } from './helpers/link-probe.ts';
import { withTimeout } from './helpers/timeout.ts';

type WsOptions = Parameters<typeof wsPlugin.create>[0];

function makeWs(options: Partial<WsOptions> = {}): StreamTransportPlugin {
  return wsPlugin.create(options as WsOptions, testContext()) as StreamTransportPlugin;
}

function portOf(address: string): number {
  return Number(address.slice(address.lastIndexOf(':') + 1));
}

/** A dshield ws server whose links are handed to the test one by one. */
async function startServer(t: StreamTransportPlugin): Promise<{ listener: TransportListener; nextLink(): Promise<Link> }> {
  const queue: Link[] = [];
  const waiting: ((l: Link) => void)[] = [];
  const listener = await t.listen('127.0.0.1:0', (l) => {
    const w = waiting.shift();
    if (w) w(l);
    else queue.push(l);
  });
  return {
    listener,
    nextLink: () =>
      withTimeout(
        queue.length ? Promise.resolve(queue.shift()!) : new Promise<Link>((r) => waiting.push(r)),
        5_000,
        'a server link',
      ),
  };
}

/**
 * A minimal reverse proxy: an upgrade under /vpn/ goes to the backend with
 * the prefix replaced by `/`, X-Forwarded-For extended with the client's
 * address, then the two sockets are piped. Anything else: 502.
 */
async function startProxy(backendPort: number): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = http.createServer((_req, res) => {
    res.writeHead(502).end();
  });
  server.on('upgrade', (req: http.IncomingMessage, client: net.Socket, head: Buffer) => {
    sockets.add(client);
    client.on('error', () => {});
    if (!req.url?.startsWith('/vpn/')) {
      client.end('HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n');
      return;
    }
    const backend = net.connect(backendPort, '127.0.0.1');
    sockets.add(backend);
    backend.on('error', () => client.destroy());
    client.on('close', () => backend.destroy());
    backend.on('close', () => client.destroy());
    const headers: string[] = [];
    let forwardedFor = '';
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      const [name, value] = [req.rawHeaders[i]!, req.rawHeaders[i + 1]!];
      if (name.toLowerCase() === 'x-forwarded-for') forwardedFor = value;
      else headers.push(`${name}: ${value}`);
    }
    const clientIp = client.remoteAddress!.replace(/^::ffff:/, '');
    headers.push(`X-Forwarded-For: ${forwardedFor ? `${forwardedFor}, ${clientIp}` : clientIp}`);
    backend.write(`GET ${req.url.slice('/vpn'.length)} HTTP/1.1\r\n${headers.join('\r\n')}\r\n\r\n`);
    if (head.length) backend.write(head);
    client.pipe(backend);
    backend.pipe(client);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: (server.address() as net.AddressInfo).port,
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/**
 * Sends raw bytes and returns what the server answers: everything until it
 * closes, or (headOnly) the response head once it is complete. Bounded.
 */
async function rawExchange(port: number, request: string, headOnly = false): Promise<string> {
  const sock = net.connect(port, '127.0.0.1');
  let out = '';
  const done = new Promise<void>((resolve) => {
    sock.on('data', (c) => {
      out += c.toString('latin1');
      if (headOnly && out.includes('\r\n\r\n')) resolve();
    });
    sock.once('close', () => resolve());
  });
  sock.on('error', () => {});
  sock.write(request);
  try {
    await withTimeout(done, 3_000, `the server to answer ${JSON.stringify(request.split('\r\n')[0])}`);
  } finally {
    sock.destroy();
  }
  return out;
}

async function rejection(p: Promise<Link>, ms = 5_000): Promise<unknown> {
  return withTimeout(
    p.then(
      (l) => (l.destroy(), null),
      (e: unknown) => e,
    ),
    ms,
    'a dial to fail',
  );
}

test('a record round trip through a reverse proxy at /vpn/, with X-Forwarded-For as remoteAddress', async () => {
  const t = makeWs();
  const { listener, nextLink } = await startServer(t);
  const proxy = await startProxy(portOf(listener.address));
  try {
    const client = await withTimeout(t.dial(`ws://127.0.0.1:${proxy.port}/vpn/dshield`), 5_000, 'dial via proxy');
    const server = await nextLink();
    assert.is(server.remoteAddress, '127.0.0.1:0', 'the forwarded client address (no port known)');
    assert.is(client.remoteAddress, `127.0.0.1:${proxy.port}`, 'the client sees the proxy');
    const a = probeLink(client);
    const b = probeLink(server);
    const sizes = [0, 1, 1000, 16384, 65535, ...Array(300).fill(16384)];
    await sendAll(a, sizes.map((n, i) => patterned(i, n)));
    b.link.send(patterned(0, 4321));
    await b.until(() => b.records.length >= sizes.length, 10_000, 'records through the proxy');
    await a.until(() => a.records.length >= 1, 5_000, 'the reply through the proxy');
    for (let i = 0; i < sizes.length; i++) assert.ok(b.records[i]!.equals(patterned(i, sizes[i]!)), `record ${i}`);
    assert.ok(a.records[0]!.equals(patterned(0, 4321)));
    client.close();
    await a.until(() => a.closes.length === 1 && b.closes.length === 1, 5_000, 'close through the proxy');
  } finally {
    await proxy.close();
    await listener.close();
  }
});

test('X-Forwarded-For: the first entry wins; ports and IPv6 are understood; junk is ignored', async () => {
  const t = makeWs();
  const { listener, nextLink } = await startServer(t);
  const cases: [string, RegExp][] = [
    ['203.0.113.7, 10.0.0.1', /^203\.0\.113\.7:0$/],
    ['2001:db8::1', /^\[2001:db8::1\]:0$/],
    ['[2001:db8::2]:4711, 10.0.0.1', /^\[2001:db8::2\]:4711$/],
    ['198.51.100.9:5555', /^198\.51\.100\.9:5555$/],
    ['not-an-address', /^127\.0\.0\.1:[1-9]\d*$/],
  ];
  try {
    for (const [header, expected] of cases) {
      const ws = new WebSocket(`ws://${listener.address}/dshield`, { headers: { 'X-Forwarded-For': header } });
      ws.on('error', () => {});
      const link = await nextLink();
      assert.match(link.remoteAddress, expected, header);
      link.destroy();
      ws.terminate();
    }
  } finally {
    await listener.close();
  }
});

test('a boring web server: every non-tunnel request gets the same plain 404, and nothing says dshield', async () => {
  const t = makeWs({ path: '/secret-path' });
  const { listener } = await startServer(t);
  const port = portOf(listener.address);
  const upgrade = (path: string, extra = '') =>
    `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n${extra}\r\n`;
  try {
    const answers = {
      root: await rawExchange(port, 'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'),
      pathWithoutUpgrade: await rawExchange(port, 'GET /secret-path HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'),
      post: await rawExchange(port, 'POST /secret-path HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi'),
      upgradeElsewhere: await rawExchange(port, upgrade('/dshield', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n')),
      upgradeWithoutKey: await rawExchange(port, upgrade('/secret-path')),
      upgradeBadVersion: await rawExchange(
        port,
        upgrade('/secret-path', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n').replace('Version: 13', 'Version: 7'),
      ),
    };
    for (const [what, answer] of Object.entries(answers)) {
      assert.match(answer, /^HTTP\/1\.1 404 Not Found\r\n/, what);
      assert.ok(answer.endsWith('\r\n\r\nNot Found'), `${what}: body`);
      assert.not.match(answer.toLowerCase(), 'dshield', `${what}: no name`);
      assert.not.match(answer.toLowerCase(), /\r\n(server|x-powered-by|sec-websocket-[a-z]+):/, `${what}: no identifying header`);
    }
    // The real path with a proper handshake upgrades (the control for the above).
    const good = await rawExchange(port, upgrade('/secret-path', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n'), true);
    assert.match(good, /^HTTP\/1\.1 101 Switching Protocols\r\n/);
    assert.not.match(good.toLowerCase(), 'dshield');
  } finally {
    await listener.close();
  }
});

test('dial: a wrong path is UNREACHABLE (reason rejected, says the HTTP status)', async () => {
  const t = makeWs();
  const { listener } = await startServer(t);
  try {
    const err = await rejection(t.dial(`ws://${listener.address}/elsewhere`));
    assert.ok(isDshieldError(err, 'DSHIELD_ERR_UNREACHABLE'), String(err));
    assert.is((err as { detail?: { reason?: string } }).detail?.reason, 'rejected');
    assert.match((err as Error).message, 'HTTP 404');
  } finally {
    await listener.close();
  }
});

test('dial: "host:port", and a URL without a path, use the configured path', async () => {
  const t = makeWs({ path: '/p/q' });
  const { listener, nextLink } = await startServer(t);
  try {
    for (const address of [listener.address, `ws://${listener.address}`, `ws://${listener.address}/p/q?x=1`]) {
      const link = await withTimeout(t.dial(address), 5_000, `dial ${address}`);
      (await nextLink()).destroy();
      link.destroy();
    }
    const err = await rejection(t.dial(`http://${listener.address}/p/q`));
    assert.ok(isDshieldError(err, 'DSHIELD_ERR_CONFIG'), String(err));
  } finally {
    await listener.close();
  }
});

test('dial: a server that accepts TCP but never answers times out (connectTimeout), and abort cancels', async () => {
  const silent = net.createServer((s) => s.on('error', () => {}));
  const held = new Set<net.Socket>();
  silent.on('connection', (s) => held.add(s));
  await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
  const port = (silent.address() as net.AddressInfo).port;
  try {
    const t = makeWs({ connectTimeout: 300 });
    const started = Date.now();
    const err = await rejection(t.dial(`127.0.0.1:${port}`));
    assert.ok(isDshieldError(err, 'DSHIELD_ERR_UNREACHABLE'), String(err));
    assert.is((err as { detail?: { reason?: string } }).detail?.reason, 'timeout');
    assert.ok(Date.now() - started < 3_000, 'bounded by connectTimeout');

    const c = new AbortController();
    const pending = rejection(makeWs().dial(`127.0.0.1:${port}`, c.signal));
    await sleep(50);
    c.abort();
    const aborted = await pending;
    assert.is((aborted as Error).name, 'AbortError');
  } finally {
    for (const s of held) s.destroy();
    await new Promise<void>((r) => silent.close(() => r()));
  }
});

test('zeroMask: records still arrive intact', async () => {
  const t = makeWs({ zeroMask: true });
  const { listener, nextLink } = await startServer(t);
  try {
    const a = probeLink(await withTimeout(t.dial(listener.address), 5_000, 'dial'));
    const b = probeLink(await nextLink());
    const sizes = [0, 5, 16384, 65535];
    await sendAll(a, sizes.map((n, i) => patterned(i, n)));
    await b.until(() => b.records.length >= sizes.length, 5_000, 'records');
    for (let i = 0; i < sizes.length; i++) assert.ok(b.records[i]!.equals(patterned(i, sizes[i]!)));
    a.link.destroy();
  } finally {
    await listener.close();
  }
});

test('wss:// with a self-signed certificate: refused by default (reason tls), works with rejectUnauthorized false', async () => {
  let dir: string | undefined;
  try {
    dir = mkdtempSync(join(tmpdir(), 'dshield-ws-tls-'));
    try {
      execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
        '-subj', '/CN=localhost', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem')], { stdio: 'ignore' });
    } catch {
      console.log('  (skipped: openssl is not available to make a test certificate)');
      return;
    }
    const server = wsPlugin.create(
      { tlsCert: 'cert.pem', tlsKey: 'key.pem' } as WsOptions,
      testContext({ baseDir: dir }),
    ) as StreamTransportPlugin;
    const { listener, nextLink } = await startServer(server);
    try {
      const strict = await rejection(makeWs().dial(`wss://${listener.address}/dshield`));
      assert.ok(isDshieldError(strict, 'DSHIELD_ERR_UNREACHABLE'), String(strict));
      assert.is((strict as { detail?: { reason?: string } }).detail?.reason, 'tls');

      const a = probeLink(await withTimeout(makeWs({ rejectUnauthorized: false }).dial(`wss://${listener.address}`), 5_000, 'wss dial'));
      const b = probeLink(await nextLink());
      // Bulk records too: a plain server link is made again to read them in place; a TLS one reads on as it is.
      const sizes = [0, 16384, 65535, ...Array.from({ length: 48 }, () => 65535)];
      await sendAll(a, sizes.map((n, i) => patterned(i, n)));
      b.link.send(patterned(9, 9));
      await b.until(() => b.records.length >= sizes.length, 5_000, 'records over wss');
      await a.until(() => a.records.length >= 1, 5_000, 'reply over wss');
      for (let i = 0; i < sizes.length; i++) assert.ok(b.records[i]!.equals(patterned(i, sizes[i]!)));
      a.link.close();
      await a.until(() => a.closes.length === 1 && b.closes.length === 1, 5_000, 'wss close');
    } finally {
      await listener.close();
    }
  } finally {
    if (dir) rmSync(dir, { recursive: true, force: true });
  }
});

test('missing TLS files and half a TLS config are configuration errors', async () => {
  assert.throws(
    () => wsPlugin.create({ tlsCert: 'a.pem' } as WsOptions, testContext()),
    (e: unknown) => isDshieldError(e, 'DSHIELD_ERR_CONFIG'),
  );
  const t = makeWs({ tlsCert: 'no-such-cert.pem', tlsKey: 'no-such-key.pem' });
  const err = await t.listen('127.0.0.1:0', (l) => l.destroy()).then(
    (l) => (void l.close(), null),
    (e: unknown) => e,
  );
  assert.ok(isDshieldError(err, 'DSHIELD_ERR_CONFIG'), String(err));
  assert.match((err as Error).message, 'no-such-cert.pem');
});

test.run();
