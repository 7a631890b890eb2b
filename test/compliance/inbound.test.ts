/**
 * Compliance suite for proxy inbound plugins: every plugins/inbound-*.ts that
 * is a proxy (socks5, http) is driven by real curl and by raw sockets against
 * a fake Tunnel (test/helpers/fake-tunnel.ts) that connects straight to a
 * loopback web server, or fails the way the server would.
 *
 * Inbounds that are not proxies (a future "tun") are skipped with a message.
 */
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkPluginDefinition } from '../../core/define.ts';
import type { InboundPlugin, OptionsSchema, PluginDefinition } from '../../core/types.ts';
import { testContext } from '../helpers/context.ts';
import { fakeTunnel, type FakeTunnel } from '../helpers/fake-tunnel.ts';
import { RawSocket } from '../helpers/raw-socket.ts';
import { withTimeout } from '../helpers/timeout.ts';
import { sha256, startWebServer, type WebServer } from '../helpers/web.ts';

const CURL = '/usr/bin/curl';
const PLUGIN_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
const files = readdirSync(PLUGIN_DIR).filter((f) => /^inbound-.+\.ts$/.test(f)).sort();
const PROXY_KINDS = ['socks5', 'http'] as const;
type ProxyKind = (typeof PROXY_KINDS)[number];

const UPLOAD_BYTES = 3 * 1024 * 1024 + 17;
const DOWNLOAD_BYTES = 3 * 1024 * 1024 + 5;

// ---------------------------------------------------------------------------
// Shared fixtures

function optionsFor(schema: OptionsSchema | undefined, extra: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(schema ?? {})) if (spec.default !== undefined) out[name] = spec.default;
  return { ...out, ...extra };
}

interface CurlResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs curl with a bound; the proxy comes only from the arguments, never the environment. */
function curl(args: string[], ms = 30_000): Promise<CurlResult> {
  return new Promise((resolve, reject) => {
    execFile(
      CURL,
      ['-sS', '--max-time', String(Math.floor(ms / 1000) - 5), ...args],
      { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: tmpdir() }, timeout: ms, maxBuffer: 8 * 1024 * 1024, encoding: 'utf8' },
      (err, stdout, stderr) => {
        if (err && typeof (err as NodeJS.ErrnoException).code === 'string') return reject(err); // curl missing
        const code = err ? Number((err as { code?: number }).code ?? 1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

function ipv6LoopbackWorks(): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(0, '::1', () => s.close(() => resolve(true)));
  });
}

/** A TCP echo server (for raw tunnels). */
async function startTcpEcho(): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => sockets.delete(s));
    s.pipe(s);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** An origin that answers with what it received: the request line target and the raw headers. */
async function startHeaderEcho(): Promise<{ port: number; close(): Promise<void> }> {
  const server: HttpServer = createHttpServer((req, res) => {
    const body = JSON.stringify({ url: req.url, method: req.method, headers: req.rawHeaders });
    res.writeHead(200, { 'content-type': 'application/json', connection: 'keep-alive', 'keep-alive': 'timeout=77, max=3', 'x-origin': 'yes' });
    res.end(body);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    port: (server.address() as AddressInfo).port,
    close: () =>
      new Promise((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

async function startUdpEcho(): Promise<{ port: number; received: number; close(): void }> {
  const socket: UdpSocket = createSocket('udp4');
  const echo = { port: 0, received: 0, close: () => socket.close() };
  socket.on('message', (msg, rinfo) => {
    echo.received++;
    socket.send(Buffer.concat([Buffer.from('echo:'), msg]), rinfo.port, rinfo.address);
  });
  await new Promise<void>((r) => socket.bind(0, '127.0.0.1', () => r()));
  echo.port = socket.address().port;
  return echo;
}

const hasV6 = await ipv6LoopbackWorks();
const payload = randomBytes(DOWNLOAD_BYTES);
const uploadData = randomBytes(UPLOAD_BYTES);

// Everything async happens before the first suite is queued: uvu starts running on the next timer tick.
const definitions: [string, PluginDefinition<'inbound'>][] = [];
for (const file of files) {
  const mod = (await import(new URL(file, `file://${PLUGIN_DIR}`).href)) as { default: unknown };
  definitions.push([file, checkPluginDefinition(mod.default, 'inbound', `plugins/${file}`) as PluginDefinition<'inbound'>]);
}

/** State one proxy suite shares across its tests. */
interface Fixture {
  def: PluginDefinition<'inbound'>;
  web: WebServer;
  web6?: WebServer;
  tunnel: FakeTunnel;
  proxy: InboundPlugin;
  /** "127.0.0.1:port" */
  proxyAddr: string;
  proxyPort: number;
  address: string;
  dir: string;
  extra: InboundPlugin[];
  extraTunnels: FakeTunnel[];
}

/** Starts another instance of the same plugin (e.g. with credentials), closed after the test. */
async function startExtra(f: Fixture, options: Record<string, unknown>): Promise<{ proxy: InboundPlugin; port: number; tunnel: FakeTunnel }> {
  const tunnel = fakeTunnel();
  const proxy = await f.def.create(optionsFor(f.def.options, { listen: '127.0.0.1:0', ...options }), testContext({ mode: 'client' }));
  f.extra.push(proxy);
  f.extraTunnels.push(tunnel);
  const { address } = await proxy.start(tunnel);
  return { proxy, tunnel, port: Number(address.slice(address.lastIndexOf(':') + 1)) };
}

function proxySuite(file: string, def: PluginDefinition<'inbound'>, kind: ProxyKind) {
  const test = suite(`inbound ${def.name} (${file})`);
  const f = { def, extra: [], extraTunnels: [] } as unknown as Fixture;

  test.before(async () => {
    f.web = await startWebServer(payload);
    if (hasV6) f.web6 = await startWebServer(payload, '::1');
    f.tunnel = fakeTunnel();
    f.proxy = await def.create(optionsFor(def.options, { listen: '127.0.0.1:0' }), testContext({ mode: 'client' }));
    f.address = (await f.proxy.start(f.tunnel)).address;
    f.proxyAddr = f.address.replace(/^[a-z0-9]+:\/\//, '');
    f.proxyPort = Number(f.proxyAddr.slice(f.proxyAddr.lastIndexOf(':') + 1));
    f.dir = mkdtempSync(join(tmpdir(), 'dshield-inbound-'));
    writeFileSync(join(f.dir, 'upload.bin'), uploadData);
  });
  test.after.each(async () => {
    for (const p of f.extra.splice(0)) await p.close?.();
    for (const t of f.extraTunnels.splice(0)) t.close();
  });
  test.after(async () => {
    await f.proxy?.close?.();
    await f.proxy?.close?.(); // idempotent
    f.tunnel?.close();
    await f.web?.close();
    await f.web6?.close();
    if (f.dir) rmSync(f.dir, { recursive: true, force: true });
  });

  test('start() reports where it listens, on loopback', () => {
    assert.match(f.address, new RegExp(`^${kind}://127\\.0\\.0\\.1:\\d+$`));
  });

  test('the default listen address is on 127.0.0.1', () => {
    assert.match(String(def.options?.listen?.default), /^127\.0\.0\.1:\d+$/);
  });

  // The ways curl can use this proxy: [label, curl arguments, does curl send the name (not an IP)?]
  const variants: [string, string[], boolean][] =
    kind === 'socks5'
      ? [
          ['--socks5-hostname', ['--socks5-hostname', '<proxy>'], true],
          ['--socks5 (IPv4 address)', ['--socks5', '<proxy>'], false],
        ]
      : [
          ['-x (absolute URI)', ['-x', 'http://<proxy>'], true],
          ['-p -x (CONNECT)', ['-p', '-x', 'http://<proxy>'], true],
        ];
  const withProxy = (args: string[]) => args.map((a) => a.replace('<proxy>', f.proxyAddr));
  const urlFor = (byName: boolean, path: string) => `http://${byName ? 'origin.test' : '127.0.0.1'}:${f.web.port}${path}`;

  for (const [label, args, byName] of variants) {
    test(`curl ${label}: GET through the tunnel`, async () => {
      const before = f.tunnel.opened.length;
      const r = await curl([...withProxy(args), urlFor(byName, '/hello')]);
      assert.is(r.code, 0, r.stderr);
      assert.is(r.stdout, 'hello through the tunnel\n');
      const opened = f.tunnel.opened.slice(before);
      assert.equal(opened, [{ host: byName ? 'origin.test' : '127.0.0.1', port: f.web.port }], 'the tunnel was asked for the target');
    });

    test(`curl ${label}: POST upload of ${(UPLOAD_BYTES / 1048576).toFixed(1)} MB arrives intact`, async () => {
      const r = await curl([...withProxy(args), '--data-binary', `@${join(f.dir, 'upload.bin')}`, '-H', 'Content-Type: application/octet-stream', urlFor(byName, '/upload')]);
      assert.is(r.code, 0, r.stderr);
      assert.is(r.stdout, `${sha256(uploadData)} ${UPLOAD_BYTES}`);
    });

    test(`curl ${label}: download of ${(DOWNLOAD_BYTES / 1048576).toFixed(1)} MB arrives intact`, async () => {
      const out = join(f.dir, `download-${label.replace(/\W+/g, '_')}.bin`);
      const r = await curl([...withProxy(args), '-o', out, urlFor(byName, '/download')]);
      assert.is(r.code, 0, r.stderr);
      const got = readFileSync(out);
      assert.is(got.length, DOWNLOAD_BYTES);
      assert.is(sha256(got), sha256(payload));
    });
  }

  // Error mapping as curl sees it.
  const failures: [string, number][] = [
    ['denied.test', kind === 'socks5' ? 0x02 : 403],
    ['refused.test', kind === 'socks5' ? 0x05 : 502],
    ['unreachable.test', kind === 'socks5' ? 0x04 : 502],
    ['netunreach.test', kind === 'socks5' ? 0x03 : 502],
    ['nxdomain.test', kind === 'socks5' ? 0x04 : 502],
    ['slow.test', kind === 'socks5' ? 0x06 : 504],
    ['down.test', kind === 'socks5' ? 0x01 : 502],
  ];
  test('curl: each failure of the tunnel maps to its reply', async () => {
    for (const [host, expected] of failures) {
      if (kind === 'socks5') {
        const r = await curl(['--socks5-hostname', f.proxyAddr, `http://${host}/`]);
        assert.is(r.code, 97, `${host}: curl reports a proxy failure (${r.stderr})`);
        assert.ok(r.stderr.includes(`(${expected})`), `${host}: reply ${expected} expected in: ${r.stderr.trim()}`);
      } else {
        const plain = await curl(['-x', `http://${f.proxyAddr}`, '-w', '%{http_code}', '-o', '/dev/null', `http://${host}/`]);
        assert.is(plain.stdout, String(expected), `${host} via absolute URI`);
        const tunnelled = await curl(['-p', '-x', `http://${f.proxyAddr}`, '-w', '%{http_connect}', '-o', '/dev/null', `http://${host}/`]);
        assert.is(tunnelled.code, 56, `${host}: CONNECT fails (${tunnelled.stderr})`);
        assert.is(tunnelled.stdout, String(expected), `${host} via CONNECT`);
      }
    }
  });

  test('the proxy keeps serving after every kind of failure', async () => {
    const r = await curl([...withProxy(variants[0]![1]), urlFor(true, '/again')]);
    assert.is(r.code, 0, r.stderr);
  });

  if (kind === 'socks5') socksTests(test, f);
  else httpTests(test, f);

  test('close() stops listening and drops open connections', async () => {
    const extra = await startExtra(f, {});
    const raw = await RawSocket.open(extra.port);
    await extra.proxy.close?.();
    await withTimeout(raw.closed, 3_000, 'open connection dropped by close()');
    const again = await RawSocket.open(extra.port, '127.0.0.1', 2_000).then(
      (r) => (r.destroy(), 'connected'),
      (err: NodeJS.ErrnoException) => err.code,
    );
    assert.is(again, 'ECONNREFUSED', 'no longer listening');
  });

  test.run();
}

// ---------------------------------------------------------------------------
// SOCKS5 byte-level tests

type Test = ReturnType<typeof suite>;

function socksRequest(cmd: number, atypAndAddress: number[], port: number): Buffer {
  return Buffer.from([5, cmd, 0, ...atypAndAddress, port >> 8, port & 255]);
}
const domain = (name: string) => [3, name.length, ...Buffer.from(name)];

/** Greeting with no auth, then a request; returns the reply header (first 4 bytes + address + port). */
async function socksHandshake(port: number, request: Buffer): Promise<{ raw: RawSocket; reply: Buffer }> {
  const raw = await RawSocket.open(port);
  raw.write([5, 1, 0]);
  assert.equal([...(await raw.read(2, 5_000, 'method selection'))], [5, 0]);
  raw.write(request);
  const head = await raw.read(4, 5_000, 'reply header');
  const addrLen = head[3] === 1 ? 4 : head[3] === 4 ? 16 : 1 + (await raw.read(1))[0]!;
  const rest = await raw.read(addrLen + 2, 5_000, 'reply address');
  return { raw, reply: Buffer.concat([head, rest]) };
}

function socksTests(test: Test, f: Fixture) {
  test('raw: each failure maps to its RFC 1928 reply code', async () => {
    const expected: Record<string, number> = {
      'denied.test': 0x02,
      'refused.test': 0x05,
      'unreachable.test': 0x04,
      'netunreach.test': 0x03,
      'nxdomain.test': 0x04,
      'slow.test': 0x06,
      'down.test': 0x01,
    };
    for (const [host, code] of Object.entries(expected)) {
      const { raw, reply } = await socksHandshake(f.proxyPort, socksRequest(1, domain(host), 80));
      assert.is(reply[0], 5);
      assert.is(reply[1], code, host);
      await withTimeout(raw.readToEnd(), 4_000, `${host}: proxy closes after a failure reply`);
      raw.destroy();
    }
  });

  test('raw: CONNECT with ATYP IPv4 and an HTTP exchange over it', async () => {
    const { raw, reply } = await socksHandshake(f.proxyPort, socksRequest(1, [1, 127, 0, 0, 1], f.web.port));
    assert.is(reply[1], 0);
    raw.write(`GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    const body = (await raw.readToEnd(5_000)).toString();
    assert.match(body, /^HTTP\/1\.1 200/);
    assert.match(body, /hello through the tunnel/);
    raw.destroy();
  });

  test('raw: CONNECT with ATYP IPv6 to ::1', async () => {
    if (!f.web6) {
      console.log('  (skipped: no IPv6 loopback here)');
      return;
    }
    const before = f.tunnel.opened.length;
    const v6 = [4, ...Array(15).fill(0), 1];
    const { raw, reply } = await socksHandshake(f.proxyPort, socksRequest(1, v6, f.web6.port));
    assert.is(reply[1], 0);
    assert.equal(f.tunnel.opened.slice(before), [{ host: '::1', port: f.web6.port }], 'the target is the IPv6 address, canonical');
    raw.write(`GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    assert.match((await raw.readToEnd(5_000)).toString(), /hello through the tunnel/);
    raw.destroy();
  });

  test('raw: bytes sent right after the request (before the reply) reach the destination', async () => {
    const raw = await RawSocket.open(f.proxyPort);
    // Greeting, request and data in one write: an optimistic client.
    raw.write(
      Buffer.concat([
        Buffer.from([5, 1, 0]),
        socksRequest(1, domain('origin.test'), f.web.port),
        Buffer.from('GET /early HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'),
      ]),
    );
    const all = (await raw.readToEnd(5_000)).toString('latin1');
    assert.ok(all.startsWith('\x05\x00\x05\x00'), 'method selection then success');
    assert.match(all, /hello through the tunnel/);
    raw.destroy();
  });

  test('raw: a handshake dribbled one byte at a time works', async () => {
    const raw = await RawSocket.open(f.proxyPort);
    const bytes = Buffer.concat([Buffer.from([5, 1, 0]), socksRequest(1, domain('origin.test'), f.web.port)]);
    for (const b of bytes) {
      raw.write([b]);
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal([...(await raw.read(2))], [5, 0]);
    const reply = await raw.read(4);
    assert.is(reply[1], 0);
    raw.destroy();
  });

  test('raw: BIND is "command not supported" (0x07); an unknown ATYP is 0x08', async () => {
    const bind = await socksHandshake(f.proxyPort, socksRequest(2, [1, 127, 0, 0, 1], 80));
    assert.is(bind.reply[1], 0x07);
    bind.raw.destroy();
    const raw = await RawSocket.open(f.proxyPort);
    raw.write([5, 1, 0]);
    await raw.read(2);
    raw.write([5, 1, 0, 9, 1, 2, 3, 4, 0, 80]);
    const reply = await raw.read(2);
    assert.is(reply[1], 0x08);
    await withTimeout(raw.readToEnd(), 4_000, 'close after 0x08');
    raw.destroy();
  });

  test('raw: garbage closes the connection, and the next client is served', async () => {
    const garbage = [Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'), Buffer.from([4, 1, 0, 80, 127, 0, 0, 1, 0]), randomBytes(4096), Buffer.from([5, 0])];
    for (const g of garbage) {
      const raw = await RawSocket.open(f.proxyPort);
      raw.write(g);
      const got = await withTimeout(raw.readToEnd(4_000), 5_000, 'garbage connection closed');
      assert.ok(got.length <= 2, `no meaningful answer to garbage (${got.length} bytes)`);
      raw.destroy();
    }
    // A request with an endless domain name cannot grow the buffer: it is cut at the cap.
    const raw = await RawSocket.open(f.proxyPort);
    raw.write([5, 1, 0]);
    await raw.read(2);
    raw.write(Buffer.concat([Buffer.from([5, 1, 0, 3, 255]), Buffer.alloc(4000, 0x61)]));
    await withTimeout(raw.closed, 4_000, 'oversized request closed');
    const r = await curl(['--socks5-hostname', f.proxyAddr, `http://origin.test:${f.web.port}/after-garbage`]);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout, 'hello through the tunnel\n');
  });

  test('raw: a stalled handshake is dropped after handshakeTimeout', async () => {
    const extra = await startExtra(f, { handshakeTimeout: 300 });
    const raw = await RawSocket.open(extra.port);
    raw.write([5, 1]); // and nothing more
    const started = Date.now();
    await withTimeout(raw.closed, 3_000, 'stalled handshake dropped');
    assert.ok(Date.now() - started >= 200, 'not before the timeout');
  });

  test('username/password: right credentials pass, wrong ones and "no auth" are refused', async () => {
    const extra = await startExtra(f, { username: 'alice', password: 's3cret' });
    // curl with the right credentials
    const ok = await curl(['--socks5-hostname', `127.0.0.1:${extra.port}`, '-U', 'alice:s3cret', `http://origin.test:${f.web.port}/auth`]);
    assert.is(ok.code, 0, ok.stderr);
    assert.is(ok.stdout, 'hello through the tunnel\n');
    // curl with a wrong password
    const bad = await curl(['--socks5-hostname', `127.0.0.1:${extra.port}`, '-U', 'alice:wrong', `http://origin.test:${f.web.port}/auth`]);
    assert.is(bad.code, 97, bad.stderr);
    assert.is(extra.tunnel.opened.length, 1, 'only the authenticated request opened a stream');

    // Raw: "no auth" only is refused with 0xFF.
    const none = await RawSocket.open(extra.port);
    none.write([5, 1, 0]);
    assert.equal([...(await none.read(2))], [5, 0xff]);
    await withTimeout(none.readToEnd(), 4_000, 'close after 0xFF');
    none.destroy();
    // Raw: RFC 1929 exchange, wrong then right.
    for (const [user, pass, status] of [['alice', 'nope', 1], ['bob', 's3cret', 1], ['alice', 's3cret', 0]] as const) {
      const raw = await RawSocket.open(extra.port);
      raw.write([5, 2, 0, 2]);
      assert.equal([...(await raw.read(2))], [5, 2], 'username/password selected');
      raw.write([1, user.length, ...Buffer.from(user), pass.length, ...Buffer.from(pass)]);
      const answer = await raw.read(2);
      assert.is(answer[0], 1);
      assert.is(answer[1] === 0 ? 0 : 1, status, `${user}:${pass}`);
      if (status === 0) {
        raw.write(socksRequest(1, domain('origin.test'), f.web.port));
        assert.is((await raw.read(4))[1], 0, 'CONNECT after authentication succeeds');
      } else {
        await withTimeout(raw.readToEnd(), 4_000, 'close after failed authentication');
      }
      raw.destroy();
    }
  });

  test('UDP ASSOCIATE: round trip through openUdp, FRAG != 0 dropped, only the client may send, ends with the TCP connection', async () => {
    const echo = await startUdpEcho();
    const client = createSocket('udp4');
    const stranger = createSocket('udp4');
    try {
      await new Promise<void>((r) => client.bind(0, '127.0.0.1', () => r()));
      await new Promise<void>((r) => stranger.bind(0, '127.0.0.1', () => r()));
      const udpBefore = f.tunnel.udpStats.opened;
      const { raw, reply } = await socksHandshake(f.proxyPort, socksRequest(3, [1, 0, 0, 0, 0], 0));
      assert.is(reply[1], 0);
      assert.is(reply[3], 1, 'bound address is IPv4 (the listener is on 127.0.0.1)');
      assert.equal([...reply.subarray(4, 8)], [127, 0, 0, 1]);
      const relayPort = reply.readUInt16BE(8);
      assert.ok(relayPort > 0);
      assert.is(f.tunnel.udpStats.opened, udpBefore + 1);

      const header = (frag: number) => Buffer.from([0, 0, frag, 1, 127, 0, 0, 1, echo.port >> 8, echo.port & 255]);
      const next = () =>
        withTimeout(
          new Promise<Buffer>((resolve) => client.once('message', (m) => resolve(m))),
          5_000,
          'UDP reply through the association',
        );

      const first = next();
      client.send(Buffer.concat([header(0), Buffer.from('ping-1')]), relayPort, '127.0.0.1');
      const got = await first;
      assert.equal([...got.subarray(0, 10)], [...header(0)], 'reply carries the SOCKS UDP header with the source');
      assert.is(got.subarray(10).toString(), 'echo:ping-1');

      // A fragment is dropped; a datagram from another port is dropped.
      client.send(Buffer.concat([header(1), Buffer.from('fragment')]), relayPort, '127.0.0.1');
      stranger.send(Buffer.concat([header(0), Buffer.from('stranger')]), relayPort, '127.0.0.1');
      // A domain target works too.
      const second = next();
      const byName = Buffer.from([0, 0, 0, ...domain('origin.test'), echo.port >> 8, echo.port & 255]);
      client.send(Buffer.concat([byName, Buffer.from('ping-2')]), relayPort, '127.0.0.1');
      assert.is((await second).subarray(10).toString(), 'echo:ping-2');
      assert.is(echo.received, 2, 'the fragment and the stranger never reached the echo');
      assert.ok(f.tunnel.udpSent.some((t) => t.host === 'origin.test'), 'the domain went to the tunnel as a name');

      // Closing the control connection ends the association.
      const closedBefore = f.tunnel.udpStats.closed;
      raw.destroy();
      await withTimeout(
        (async () => {
          while (f.tunnel.udpStats.closed === closedBefore) await new Promise((r) => setTimeout(r, 20));
        })(),
        3_000,
        'association closed with its TCP connection',
      );
      client.send(Buffer.concat([header(0), Buffer.from('late')]), relayPort, '127.0.0.1');
      await new Promise((r) => setTimeout(r, 200));
      assert.is(echo.received, 2, 'nothing relayed after the association ended');
    } finally {
      client.close();
      stranger.close();
      echo.close();
    }
  });

  test('listening on [::1]: CONNECT and UDP ASSOCIATE over IPv6', async () => {
    if (!hasV6) {
      console.log('  (skipped: no IPv6 loopback here)');
      return;
    }
    const extra = await startExtra(f, { listen: '[::1]:0' });
    const echo = await startUdpEcho();
    const client = createSocket({ type: 'udp6', ipv6Only: true });
    try {
      const open = async (request: Buffer) => {
        const raw = await RawSocket.open(extra.port, '::1');
        raw.write([5, 1, 0]);
        await raw.read(2);
        raw.write(request);
        const head = await raw.read(4);
        const rest = await raw.read((head[3] === 1 ? 4 : 16) + 2);
        return { raw, reply: Buffer.concat([head, rest]) };
      };
      const tcp = await open(socksRequest(1, domain('origin.test'), f.web.port));
      assert.is(tcp.reply[1], 0);
      tcp.raw.write('GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
      assert.match((await tcp.raw.readToEnd()).toString(), /hello through the tunnel/);
      tcp.raw.destroy();

      await new Promise<void>((r) => client.bind(0, '::1', () => r()));
      const udp = await open(socksRequest(3, [1, 0, 0, 0, 0], 0));
      assert.is(udp.reply[1], 0);
      assert.is(udp.reply[3], 4, 'bound address is IPv6, next to the listener');
      assert.equal([...udp.reply.subarray(4, 20)], [...Array(15).fill(0), 1]);
      const relayPort = udp.reply.readUInt16BE(20);
      const reply = withTimeout(new Promise<Buffer>((r) => client.once('message', (m) => r(m))), 5_000, 'UDP reply over IPv6');
      client.send(Buffer.concat([Buffer.from([0, 0, 0, 1, 127, 0, 0, 1, echo.port >> 8, echo.port & 255]), Buffer.from('v6')]), relayPort, '::1');
      assert.is((await reply).subarray(10).toString(), 'echo:v6');
      udp.raw.destroy();
    } finally {
      client.close();
      echo.close();
    }
  });

  test('UDP ASSOCIATE is refused (0x07) when the udp option is false', async () => {
    const extra = await startExtra(f, { udp: false });
    const { raw, reply } = await socksHandshake(extra.port, socksRequest(3, [1, 0, 0, 0, 0], 0));
    assert.is(reply[1], 0x07);
    raw.destroy();
  });
}

// ---------------------------------------------------------------------------
// HTTP proxy tests

function httpTests(test: Test, f: Fixture) {
  test('absolute URI: origin-form request line, Host from the URL, hop-by-hop headers dropped', async () => {
    const origin = await startHeaderEcho();
    try {
      const r = await curl([
        '-x', `http://${f.proxyAddr}`,
        '-H', 'Proxy-Connection: keep-alive',
        '-H', 'Connection: X-Secret-Hop',
        '-H', 'X-Secret-Hop: 1',
        '-H', 'X-End-To-End: kept',
        '-H', 'Keep-Alive: timeout=5',
        '-H', 'Host: wrong.example',
        '-D', '-',
        '--path-as-is',
        `http://origin.test:${origin.port}/path/../x?q=1&r=%20`,
      ]);
      assert.is(r.code, 0, r.stderr);
      const [head, body] = r.stdout.split('\r\n\r\n');
      const seen = JSON.parse(body!) as { url: string; headers: string[] };
      assert.is(seen.url, '/path/../x?q=1&r=%20', 'path forwarded byte for byte, in origin-form');
      const names = seen.headers.filter((_, k) => k % 2 === 0).map((h) => h.toLowerCase());
      const value = (n: string) => seen.headers[seen.headers.findIndex((h, k) => k % 2 === 0 && h.toLowerCase() === n) + 1];
      assert.is(value('host'), `origin.test:${origin.port}`);
      assert.is(names.filter((n) => n === 'host').length, 1);
      assert.is(value('x-end-to-end'), 'kept');
      for (const gone of ['proxy-connection', 'x-secret-hop', 'keep-alive', 'proxy-authorization']) {
        assert.not.ok(names.includes(gone), `${gone} must not reach the origin`);
      }
      assert.match(head!, /x-origin: yes/i, 'end-to-end response headers come back');
      assert.not.match(head!, /timeout=77/i, 'hop-by-hop response headers do not');
    } finally {
      await origin.close();
    }
  });

  test('keep-alive from the client: two requests on one connection, one stream each', async () => {
    const before = f.tunnel.opened.length;
    const r = await curl(['-x', `http://${f.proxyAddr}`, `http://origin.test:${f.web.port}/one`, `http://origin.test:${f.web.port}/two`, '-w', '%{num_connects}\n']);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout, 'hello through the tunnel\n1\nhello through the tunnel\n0\n', 'second request reused the connection');
    assert.is(f.tunnel.opened.length - before, 2);
  });

  test('https:// absolute URI is 400, origin-form is 400, malformed CONNECT is 400', async () => {
    for (const line of ['GET https://origin.test/ HTTP/1.1', 'GET /just-a-path HTTP/1.1', 'CONNECT no-port HTTP/1.1']) {
      const raw = await RawSocket.open(f.proxyPort);
      raw.write(`${line}\r\nHost: origin.test\r\n\r\n`);
      const head = (await raw.readUntil('\r\n\r\n')).toString();
      assert.match(head, /^HTTP\/1\.1 400 /, line);
      raw.destroy();
    }
  });

  test('CONNECT: bytes sent right after the CONNECT head are forwarded', async () => {
    const echo = await startTcpEcho();
    try {
      const raw = await RawSocket.open(f.proxyPort);
      raw.write(`CONNECT origin.test:${echo.port} HTTP/1.1\r\nHost: origin.test:${echo.port}\r\n\r\nearly-bytes`);
      const head = (await raw.readUntil('\r\n\r\n')).toString();
      assert.match(head, /^HTTP\/1\.1 200 Connection Established\r\n/);
      assert.is((await raw.read(11, 5_000, 'echo of the early bytes')).toString(), 'early-bytes');
      raw.write('later');
      assert.is((await raw.read(5)).toString(), 'later');
      // Half-close passes through: our end reaches the echo, whose end comes back.
      raw.socket.end();
      await withTimeout(raw.readToEnd(), 4_000, 'tunnel closes after both ends');
      raw.destroy();
    } finally {
      await echo.close();
    }
  });

  test('CONNECT to an IPv6 literal in brackets', async () => {
    if (!f.web6) {
      console.log('  (skipped: no IPv6 loopback here)');
      return;
    }
    const before = f.tunnel.opened.length;
    const r = await curl(['-p', '-x', `http://${f.proxyAddr}`, `http://[::1]:${f.web6.port}/v6`]);
    assert.is(r.code, 0, r.stderr);
    assert.is(r.stdout, 'hello through the tunnel\n');
    assert.equal(f.tunnel.opened.slice(before), [{ host: '::1', port: f.web6.port }]);
  });

  test('Proxy-Authorization: 407 without credentials, 200 with the right ones', async () => {
    const extra = await startExtra(f, { username: 'alice', password: 's3cret' });
    const url = `http://origin.test:${f.web.port}/auth`;
    const none = await curl(['-x', `http://127.0.0.1:${extra.port}`, '-D', '-', '-o', '/dev/null', url]);
    assert.match(none.stdout, /^HTTP\/1\.1 407 /);
    assert.match(none.stdout, /Proxy-Authenticate: Basic realm="dshield"/i);
    const wrong = await curl(['-x', `http://127.0.0.1:${extra.port}`, '-U', 'alice:nope', '-w', '%{http_code}', '-o', '/dev/null', url]);
    assert.is(wrong.stdout, '407');
    const ok = await curl(['-x', `http://127.0.0.1:${extra.port}`, '-U', 'alice:s3cret', url]);
    assert.is(ok.code, 0, ok.stderr);
    assert.is(ok.stdout, 'hello through the tunnel\n');
    const connectNone = await curl(['-p', '-x', `http://127.0.0.1:${extra.port}`, '-w', '%{http_connect}', '-o', '/dev/null', url]);
    assert.is(connectNone.stdout, '407');
    const connectOk = await curl(['-p', '-x', `http://127.0.0.1:${extra.port}`, '-U', 'alice:s3cret', url]);
    assert.is(connectOk.code, 0, connectOk.stderr);
    assert.is(extra.tunnel.opened.length, 2, 'only authenticated requests opened streams');
  });

  test('a client that disconnects mid-response releases the stream; the proxy keeps serving', async () => {
    const raw = await RawSocket.open(f.proxyPort);
    raw.write(`GET http://origin.test:${f.web.port}/download HTTP/1.1\r\nHost: origin.test\r\n\r\n`);
    await raw.readUntil('\r\n\r\n');
    raw.destroy();
    const r = await curl(['-x', `http://${f.proxyAddr}`, `http://origin.test:${f.web.port}/after`]);
    assert.is(r.code, 0, r.stderr);
  });
}

// ---------------------------------------------------------------------------

const ran: string[] = [];
for (const [file, def] of definitions) {
  const kind = PROXY_KINDS.find((k) => k === def.name);
  if (!kind) {
    console.log(`skipping inbound "${def.name}" (${file}): not a proxy inbound, this suite drives socks5/http proxies only`);
    continue;
  }
  proxySuite(file, def, kind);
  ran.push(def.name);
}

const coverage = suite('inbound coverage');
coverage('both built-in proxy inbounds were found and run', () => {
  assert.ok(files.includes('inbound-socks5.ts') && files.includes('inbound-http.ts'), `found: ${files.join(', ')}`);
  assert.equal([...ran].sort(), ['http', 'socks5']);
});
coverage.run();
