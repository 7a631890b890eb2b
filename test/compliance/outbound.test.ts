/**
 * Compliance suite for outbound plugins: every plugins/outbound-*.ts must
 * enforce the egress policy on the resolved address, report failures with the
 * documented codes, and relay UDP under the same policy.
 *
 * All traffic stays on loopback: the policy denies loopback by default, which
 * is exactly what makes it a good target for these tests.
 */
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync } from 'node:fs';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { checkPluginDefinition } from '../../core/define.ts';
import { DshieldError, ErrorCodes } from '../../core/errors.ts';
import type { OptionsSchema, OutboundPlugin, PluginDefinition, Target } from '../../core/types.ts';
import { testConfig, testContext } from '../helpers/context.ts';
import { withTimeout } from '../helpers/timeout.ts';

const PLUGIN_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
const files = readdirSync(PLUGIN_DIR).filter((f) => /^outbound-.+\.ts$/.test(f)).sort();

/** Option values as the core would pass them: the schema's defaults, then the test's own. */
function optionsFor(schema: OptionsSchema | undefined, extra: Record<string, unknown> = {}): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [name, spec] of Object.entries(schema ?? {})) if (spec.default !== undefined) out[name] = spec.default;
  return { ...out, ...extra };
}

async function expectRejection(p: Promise<unknown>, what: string): Promise<DshieldError> {
  try {
    const value = await withTimeout(p, 8_000, what);
    (value as Duplex | undefined)?.destroy?.();
  } catch (err) {
    assert.instance(err, DshieldError, `${what}: rejects with a DshieldError (got ${String(err)})`);
    return err as DshieldError;
  }
  assert.unreachable(`${what}: should have been rejected`);
  throw new Error('unreachable');
}

function ipv6LoopbackWorks(): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once('error', () => resolve(false));
    s.listen(0, '::1', () => s.close(() => resolve(true)));
  });
}

interface Echo {
  port: number;
  connections: number;
  close(): Promise<void>;
}

function startTcpEcho(host: string): Promise<Echo> {
  const sockets = new Set<Socket>();
  const echo = { port: 0, connections: 0 } as Echo;
  const server: Server = createServer((s) => {
    echo.connections++;
    sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => sockets.delete(s));
    s.pipe(s);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => {
      echo.port = (server.address() as AddressInfo).port;
      echo.close = () =>
        new Promise((done) => {
          for (const s of sockets) s.destroy();
          server.close(() => done());
        });
      resolve(echo);
    });
  });
}

interface UdpEcho {
  port: number;
  received: number;
  close(): void;
}

function startUdpEcho(): Promise<UdpEcho> {
  const socket: UdpSocket = createSocket('udp4');
  const echo = { port: 0, received: 0 } as UdpEcho;
  socket.on('message', (msg, rinfo) => {
    echo.received++;
    socket.send(Buffer.concat([Buffer.from('echo:'), msg]), rinfo.port, rinfo.address);
  });
  return new Promise((resolve) => {
    socket.bind(0, '127.0.0.1', () => {
      echo.port = socket.address().port;
      echo.close = () => socket.close();
      resolve(echo);
    });
  });
}

/** A port nothing listens on: bind one, then release it. */
async function closedPort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function roundTrip(stream: Duplex, text: string): Promise<string> {
  return withTimeout(
    new Promise<string>((resolve, reject) => {
      let got = '';
      stream.on('data', (c: Buffer) => {
        got += c.toString();
        if (got.length >= text.length) resolve(got);
      });
      stream.on('error', reject);
      stream.write(text);
    }),
    5_000,
    'echo through the outbound stream',
  );
}

/**
 * Replaces dns.lookup for chosen names while a test runs: `answer` returns an
 * address, an Error, 'hang' (never answers), or undefined (use the real lookup).
 * ESM imports of node:dns see the change through syncBuiltinESMExports.
 */
function patchLookup(answer: (host: string) => string | Error | 'hang' | undefined): () => void {
  const dns = createRequire(import.meta.url)('node:dns') as typeof import('node:dns');
  const original = dns.lookup;
  const fake = ((host: string, options: unknown, callback?: unknown) => {
    const result = answer(host);
    if (result === undefined) return (original as (...a: unknown[]) => void)(host, options, callback);
    if (result === 'hang') return;
    const cb = (typeof options === 'function' ? options : callback) as (...a: unknown[]) => void;
    const all = typeof options === 'object' && options !== null && (options as { all?: boolean }).all;
    process.nextTick(() => {
      if (result instanceof Error) cb(result);
      else if (all) cb(null, [{ address: result, family: result.includes(':') ? 6 : 4 }]);
      else cb(null, result, result.includes(':') ? 6 : 4);
    });
  }) as typeof dns.lookup;
  dns.lookup = fake;
  syncBuiltinESMExports();
  return () => {
    dns.lookup = original;
    syncBuiltinESMExports();
  };
}

const hasV6 = await ipv6LoopbackWorks();
const covered: string[] = [];

// Everything async happens before the first suite is queued: uvu starts running on the next timer tick.
const definitions: [string, PluginDefinition<'outbound'>][] = [];
for (const file of files) {
  const mod = (await import(new URL(file, `file://${PLUGIN_DIR}`).href)) as { default: unknown };
  definitions.push([file, checkPluginDefinition(mod.default, 'outbound', `plugins/${file}`) as PluginDefinition<'outbound'>]);
}

for (const [file, def] of definitions) {
  const test = suite(`outbound ${def.name} (${file})`);
  const instances: OutboundPlugin[] = [];
  let echo: Echo;
  let echo6: Echo | undefined;

  /** An instance whose policy allows `allow` through the shared config (server.egress.allow). */
  const make = async (allow: string[] = [], extraOptions: Record<string, unknown> = {}): Promise<OutboundPlugin> => {
    const config = testConfig();
    config.server.egress.allow = allow;
    const instance = await def.create(optionsFor(def.options, extraOptions), testContext({ mode: 'server', config }));
    instances.push(instance);
    return instance;
  };

  test.before(async () => {
    echo = await startTcpEcho('127.0.0.1');
    if (hasV6) echo6 = await startTcpEcho('::1');
  });
  test.after.each(async () => {
    for (const i of instances.splice(0)) await i.close?.();
  });
  test.after(async () => {
    await echo.close();
    await echo6?.close();
  });

  test('connect to a loopback address is denied by default (EGRESS_DENIED), before any connection', async () => {
    const out = await make();
    const err = await expectRejection(out.connect({ host: '127.0.0.1', port: echo.port }), 'connect 127.0.0.1');
    assert.is(err.code, ErrorCodes.EGRESS_DENIED);
    assert.match(err.message, /127\.0\.0\.1/);
    assert.match(err.message, /egress policy/);
    assert.is(echo.connections, 0, 'the destination never saw a connection');
  });

  test('a name that resolves to loopback ("localhost") is denied', async () => {
    const out = await make();
    const err = await expectRejection(out.connect({ host: 'localhost', port: echo.port }), 'connect localhost');
    assert.is(err.code, ErrorCodes.EGRESS_DENIED);
    assert.match(err.message, /localhost/);
    assert.is(echo.connections, 0);
  });

  test('IPv4-mapped IPv6 and IPv6 loopback are denied by default', async () => {
    const out = await make();
    for (const host of ['::ffff:127.0.0.1', '::1', '[::1]']) {
      const err = await expectRejection(out.connect({ host, port: echo.port }), `connect ${host}`);
      assert.is(err.code, ErrorCodes.EGRESS_DENIED, host);
    }
    assert.is(echo.connections, 0);
  });

  test('allowed with server.egress.allow ["127.0.0.0/8"]: data flows both ways', async () => {
    const out = await make(['127.0.0.0/8']);
    const stream = await withTimeout(out.connect({ host: '127.0.0.1', port: echo.port }), 5_000, 'connect');
    assert.is(await roundTrip(stream, 'ping through direct'), 'ping through direct');
    stream.destroy();
    assert.is(echo.connections, 1);
  });

  test('allowed loopback via a name: "localhost" connects when 127/8 and ::1 are allowed', async () => {
    const out = await make(['127.0.0.0/8', '::1/128']);
    const stream = await withTimeout(out.connect({ host: 'localhost', port: echo.port }), 5_000, 'connect localhost');
    assert.is(await roundTrip(stream, 'hello'), 'hello');
    stream.destroy();
  });

  test('IPv6 loopback when allowed', async () => {
    if (!echo6) {
      console.log('  (skipped: no IPv6 loopback here)');
      return;
    }
    const out = await make(['::1/128']);
    const stream = await withTimeout(out.connect({ host: '::1', port: echo6.port }), 5_000, 'connect ::1');
    assert.is(await roundTrip(stream, 'v6'), 'v6');
    stream.destroy();
    // ::1 allowed does not open 127/8.
    const err = await expectRejection(out.connect({ host: '127.0.0.1', port: echo.port }), 'connect 127.0.0.1');
    assert.is(err.code, ErrorCodes.EGRESS_DENIED);
  });

  if (def.options?.allow) {
    test('the plugin\'s own "allow" option exempts ranges too', async () => {
      const out = await make([], { allow: ['127.0.0.1/32'] });
      const stream = await withTimeout(out.connect({ host: '127.0.0.1', port: echo.port }), 5_000, 'connect');
      assert.is(await roundTrip(stream, 'x'), 'x');
      stream.destroy();
    });
  }

  test('DNS rebinding: the name is resolved once and the checked address is the one connected to', async () => {
    // "rebind.test" answers 127.0.0.2 (allowed) first, then 127.0.0.1 (denied) to anyone who
    // asks again, as a rebinding attacker's DNS would.
    const secret = await startTcpEcho('127.0.0.1');
    const allowedEcho = await startTcpEcho('127.0.0.2');
    let calls = 0;
    const restore = patchLookup((host) => {
      if (host !== 'rebind.test') return undefined;
      return calls++ === 0 ? '127.0.0.2' : '127.0.0.1';
    });
    try {
      const out = await make(['127.0.0.2/32']);
      const stream = (await withTimeout(out.connect({ host: 'rebind.test', port: allowedEcho.port }), 5_000, 'connect rebind.test')) as Socket;
      assert.is(stream.remoteAddress, '127.0.0.2');
      assert.is(await roundTrip(stream, 'safe'), 'safe');
      stream.destroy();
      assert.is(secret.connections, 0, 'the denied address was never connected to');
      assert.is(calls, 1, 'one lookup per connect: the check and the connect use the same answer');
      // The second answer (denied) is refused on the next connect.
      const err = await expectRejection(out.connect({ host: 'rebind.test', port: secret.port }), 'connect rebind.test again');
      assert.is(err.code, ErrorCodes.EGRESS_DENIED);
      assert.is(secret.connections, 0);
    } finally {
      restore();
      await secret.close();
      await allowedEcho.close();
    }
  });

  test('a name that does not resolve is DESTINATION with reason "dns"', async () => {
    const restore = patchLookup((host) => (host === 'nx.test' ? Object.assign(new Error('getaddrinfo ENOTFOUND nx.test'), { code: 'ENOTFOUND' }) : undefined));
    try {
      const out = await make();
      const err = await expectRejection(out.connect({ host: 'nx.test', port: 80 }), 'connect nx.test');
      assert.is(err.code, ErrorCodes.DESTINATION);
      assert.is(err.detail?.reason, 'dns');
    } finally {
      restore();
    }
  });

  if (def.options?.connectTimeout) {
    test('a destination that does not answer within connectTimeout is DESTINATION with reason "timeout"', async () => {
      const restore = patchLookup((host) => (host === 'hang.test' ? 'hang' : undefined));
      try {
        const out = await make([], { connectTimeout: 200 });
        const started = Date.now();
        const err = await expectRejection(out.connect({ host: 'hang.test', port: 80 }), 'connect hang.test');
        assert.is(err.code, ErrorCodes.DESTINATION);
        assert.is(err.detail?.reason, 'timeout');
        assert.ok(Date.now() - started < 3_000, 'bounded by connectTimeout');
      } finally {
        restore();
      }
    });
  }

  test('a closed port is DESTINATION with reason "refused"', async () => {
    const out = await make(['127.0.0.0/8']);
    const port = await closedPort();
    const err = await expectRejection(out.connect({ host: '127.0.0.1', port }), 'connect closed port');
    assert.is(err.code, ErrorCodes.DESTINATION);
    assert.is(err.detail?.reason, 'refused');
  });

  test('a bad allow range stops creation with a CONFIG error', async () => {
    try {
      await make(['not-a-range']);
      assert.unreachable('should throw');
    } catch (err) {
      assert.instance(err, DshieldError);
      assert.is((err as DshieldError).code, ErrorCodes.CONFIG);
    }
  });

  test('udp relay: round trip to a loopback echo when allowed', async () => {
    const out = await make(['127.0.0.0/8']);
    const udpEcho = await startUdpEcho();
    const relay = out.udp();
    try {
      const reply = new Promise<{ from: Target; payload: Buffer }>((resolve) =>
        relay.onMessage((from, payload) => resolve({ from, payload })),
      );
      relay.send({ host: '127.0.0.1', port: udpEcho.port }, Buffer.from('dgram-1'));
      const { from, payload } = await withTimeout(reply, 5_000, 'udp echo reply');
      assert.is(payload.toString(), 'echo:dgram-1');
      assert.is(from.host, '127.0.0.1');
      assert.is(from.port, udpEcho.port);
      // A name resolves on the server too.
      const second = new Promise<Buffer>((resolve) => relay.onMessage((_f, p) => resolve(p)));
      relay.send({ host: 'localhost', port: udpEcho.port }, Buffer.from('dgram-2'));
      assert.is((await withTimeout(second, 5_000, 'udp echo reply via localhost')).toString(), 'echo:dgram-2');
    } finally {
      relay.close();
      udpEcho.close();
    }
  });

  test('udp relay: datagrams to denied addresses are dropped, oversized ones too', async () => {
    const out = await make();
    const udpEcho = await startUdpEcho();
    const relay = out.udp();
    let replies = 0;
    relay.onMessage(() => replies++);
    try {
      relay.send({ host: '127.0.0.1', port: udpEcho.port }, Buffer.from('denied'));
      relay.send({ host: 'localhost', port: udpEcho.port }, Buffer.from('denied by name'));
      relay.send({ host: '::ffff:127.0.0.1', port: udpEcho.port }, Buffer.from('denied mapped'));
      await new Promise((r) => setTimeout(r, 400));
      assert.is(udpEcho.received, 0, 'nothing reached the denied destination');
      assert.is(replies, 0);

      const allowed = await make(['127.0.0.0/8']);
      const relay2 = allowed.udp();
      let got = 0;
      relay2.onMessage(() => got++);
      relay2.send({ host: '127.0.0.1', port: udpEcho.port }, Buffer.alloc(65508));
      await new Promise((r) => setTimeout(r, 300));
      assert.is(udpEcho.received, 0, 'a datagram over 65507 bytes is not sent');
      relay2.close();
      relay2.send({ host: '127.0.0.1', port: udpEcho.port }, Buffer.from('after close'));
      await new Promise((r) => setTimeout(r, 200));
      assert.is(udpEcho.received, 0, 'nothing is sent after close');
      assert.is(got, 0);
    } finally {
      relay.close();
      udpEcho.close();
    }
  });

  test.run();
  covered.push(file);
}

const coverage = suite('outbound coverage');
coverage('every built-in outbound plugin has been run through the suite', () => {
  assert.ok(files.includes('outbound-direct.ts'), 'outbound-direct.ts is discovered');
  assert.equal(covered, files);
});
coverage.run();
