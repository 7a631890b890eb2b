/**
 * TUN mode's handshake parameters: a client's initiation says { tun: true };
 * a server with TUN answers { v: 1, tun: { address, dns, mtu } } with the
 * client's leased address (the same one every time), a server without TUN
 * or with a full pool refuses in silence and logs why at warn. Proxy
 * clients are served either way. Then through the CLI: the client's error
 * names server.tun, and without root TUN mode stops with one line, exit 2.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCodes, isDshieldError } from '../core/errors.ts';
import { encodeKey } from '../core/keys.ts';
import { acceptSession, connectSession, ReplayGuard, type Session } from '../core/session.ts';
import { tunHandshakeResponder } from '../core/server-tun.ts';
import { LeasePool } from '../core/tun/leases.ts';
import type { AuthPlugin, CipherPlugin, ClientIdentity, TunParams } from '../core/types.ts';
import { generateKeyPair, type KeyPair } from '../core/x25519.ts';
import chachaDef from '../plugins/cipher-chacha20-poly1305.ts';
import { CLI, runCli, writeConfig } from './helpers/cli.ts';
import { memLinkPair } from './helpers/memlink.ts';
import { memoryLogger } from './helpers/mux-pair.ts';
import { withTimeout } from './helpers/timeout.ts';

const chacha = chachaDef.create({}, undefined as never) as CipherPlugin;
const serverKey = generateKeyPair();
const clients = new Map<string, KeyPair>([
  ['alice', generateKeyPair()],
  ['bob', generateKeyPair()],
]);
const auth: AuthPlugin = {
  name: 'test',
  authorize(key: Buffer): ClientIdentity | null {
    for (const [name, kp] of clients) if (kp.publicKey.equals(key)) return { name, publicKey: key.toString('base64') };
    return null;
  },
  psk: () => undefined,
};

const dirs: string[] = [];
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), 'dshield-tunhs-'));
  dirs.push(dir);
  return dir;
}
test.after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A fake ServerTun: the real lease pool, without a device. */
function fakeTun(subnet = '10.66.0.0/24') {
  const pool = new LeasePool({ subnet, file: join(tempDir(), 'leases.json') });
  return {
    lease(name: string, isGone?: (n: string) => boolean) {
      const lease = pool.lease(name, isGone);
      const params: TunParams = { address: lease.address, dns: ['1.1.1.1'], mtu: 1420 };
      return { lease, params };
    },
  };
}

/** One handshake over memory links: the client's session, or its error; and what the server said. */
async function handshake(
  name: string,
  payload: Record<string, unknown>,
  respond: (identity: ClientIdentity, init: Record<string, unknown>) => Record<string, unknown>,
): Promise<{ session?: Session; error?: unknown; refused: string[] }> {
  const { a, b } = memLinkPair();
  const refused: string[] = [];
  acceptSession(b, {
    cipher: chacha,
    hash: 'BLAKE2s',
    staticKey: serverKey,
    auth,
    replay: new ReplayGuard(),
    handshakeTimeoutMs: 800,
    log: memoryLogger(),
    respond,
    onSession: () => {},
    onRefused: (reason) => refused.push(reason),
  });
  try {
    const session = await withTimeout(
      connectSession(a, {
        cipher: chacha,
        hash: 'BLAKE2s',
        staticKey: clients.get(name)!,
        serverPublicKey: serverKey.publicKey,
        payload,
        handshakeTimeoutMs: 500,
        log: memoryLogger(),
      }),
      3000,
      'handshake',
    );
    session.destroy();
    return { session, refused };
  } catch (error) {
    return { error, refused };
  }
}

test('a server without TUN refuses a TUN client in silence and says why at warn; proxy clients still connect', async () => {
  const log = memoryLogger();
  const respond = tunHandshakeResponder(undefined, log);
  const tun = await handshake('alice', { tun: true }, respond);
  assert.ok(isDshieldError(tun.error, ErrorCodes.HANDSHAKE_TIMEOUT), `silence, so the client times out: ${String(tun.error)}`);
  assert.is(tun.refused.length, 1);
  assert.match(tun.refused[0]!, /server\.tun/);
  assert.ok(log.lines.some((l) => l.level === 'warn' && /"alice".*server\.tun/.test(l.msg)), 'warned with the client name');

  const proxy = await handshake('alice', {}, respond);
  assert.ok(proxy.session, String(proxy.error));
  assert.equal(proxy.session!.params, { v: 1 });
});

test('a server with TUN answers the leased address, the same each time, distinct per client', async () => {
  const respond = tunHandshakeResponder(fakeTun(), memoryLogger());
  const a1 = await handshake('alice', { tun: true }, respond);
  const b1 = await handshake('bob', { tun: true }, respond);
  const a2 = await handshake('alice', { tun: true }, respond);
  assert.equal(a1.session!.params, { v: 1, tun: { address: '10.66.0.2/24', dns: ['1.1.1.1'], mtu: 1420 } });
  assert.equal((b1.session!.params.tun as TunParams).address, '10.66.0.3/24');
  assert.equal(a2.session!.params.tun, a1.session!.params.tun);
  const proxy = await handshake('bob', {}, respond);
  assert.equal(proxy.session!.params, { v: 1 }, 'no lease talk for a proxy client');
});

test('a full pool refuses in silence and logs it', async () => {
  const log = memoryLogger();
  const respond = tunHandshakeResponder(fakeTun('10.66.0.0/30'), log);
  assert.ok((await handshake('alice', { tun: true }, respond)).session);
  const bob = await handshake('bob', { tun: true }, respond);
  assert.ok(isDshieldError(bob.error, ErrorCodes.HANDSHAKE_TIMEOUT));
  assert.match(bob.refused[0]!, /is full/);
  assert.ok(log.lines.some((l) => l.level === 'warn' && /"bob".*full/.test(l.msg)));
});

// ---------------------------------------------------------------------------
// Through the CLI

const isRoot = process.getuid?.() === 0;

function inlineConfig(dir: string, extra: { server?: Record<string, unknown>; client?: Record<string, unknown> }): string {
  const s = generateKeyPair();
  const c = generateKeyPair();
  chmodSync(dir, 0o755); // readable by an unprivileged user (the setpriv runs below)
  return writeConfig(dir, {
    logging: [{ use: 'console', level: 'info' }],
    server: {
      listen: '127.0.0.1:0',
      privateKey: encodeKey(s.privateKey),
      clients: [{ name: 'alice', publicKey: encodeKey(c.publicKey) }],
      handshakeTimeout: 1000,
      ...extra.server,
    },
    client: {
      server: '127.0.0.1:9',
      privateKey: encodeKey(c.privateKey),
      serverPublicKey: encodeKey(s.publicKey),
      socks: false,
      http: false,
      handshakeTimeout: 1000,
      ...extra.client,
    },
  });
}

/** Run the CLI without root: directly when we are not root, else as nobody (setpriv). */
async function runUnprivileged(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string } | undefined> {
  if (!isRoot) return runCli(args, { timeoutMs: 30_000 });
  try {
    execFileSync('setpriv', ['--version'], { stdio: 'ignore' });
  } catch {
    return undefined;
  }
  const { spawn } = await import('node:child_process');
  const child = spawn(
    'setpriv',
    ['--reuid=65534', '--regid=65534', '--clear-groups', '--inh-caps=-all', process.execPath, '--import', import.meta.resolve('tsx'), CLI, ...args],
    { env: { ...process.env, FORCE_COLOR: '0', HOME: tmpdir() }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
  clearTimeout(timer);
  return { code, stdout, stderr };
}

test('without root, client.tun and server.tun stop with one line and exit code 2', async () => {
  const dir = tempDir();
  const config = inlineConfig(dir, { client: { tun: { stateDir: join(dir, 'state') } }, server: { tun: { stateDir: join(dir, 'state'), leasesFile: join(dir, 'leases.json') } } });
  const client = await runUnprivileged(['--mode', 'client', '--config', config]);
  if (!client) {
    console.log('  (skipped the unprivileged runs: no setpriv)');
    return;
  }
  assert.is(client.code, 2, client.stderr);
  const clientErr = client.stderr.trim().split('\n').filter((l) => l.startsWith('dshield:'));
  assert.is(clientErr.length, 1, client.stderr);
  assert.match(clientErr[0]!, /DSHIELD_ERR_(TUN|UNSUPPORTED): client\.tun needs/);
  assert.not.match(client.stderr, /\n\s+at /, 'no stack trace');

  const server = await runUnprivileged(['--mode', 'server', '--config', config]);
  assert.is(server!.code, 2, server!.stderr);
  assert.match(server!.stderr, /DSHIELD_ERR_(TUN|UNSUPPORTED): server\.tun needs/);
  assert.not.match(server!.stderr, /\n\s+at /);
});

test('a TUN client against a server without server.tun: the client says so, the server warns (in a namespace)', async () => {
  const { canRunNetns, createNamespace, deleteNamespace, exec, spawnIn, stopChild } = await import('./helpers/netns.ts');
  const why = canRunNetns(['ip']);
  if (why !== undefined) {
    console.log(`  (skipped the namespace run: ${why})`);
    return;
  }
  const ns = await createNamespace();
  const dir = tempDir();
  try {
    const config = inlineConfig(dir, { client: { tun: { stateDir: join(dir, 'state'), dns: false } } });
    const tsx = import.meta.resolve('tsx');
    const server = spawnIn(ns, process.execPath, ['--import', tsx, CLI, '--mode', 'server', '--config', config], { env: { ...process.env, FORCE_COLOR: '0' } });
    let serverOut = '';
    server.stdout!.on('data', (c: Buffer) => (serverOut += c.toString()));
    server.stderr!.on('data', (c: Buffer) => (serverOut += c.toString()));
    const address = await withTimeout(
      new Promise<string>((resolve) => {
        const check = () => {
          const m = /listening on (\S+)/.exec(serverOut);
          if (m) resolve(m[1]!);
          else setTimeout(check, 50);
        };
        check();
      }),
      20_000,
      'the server to listen',
    );
    const client = await exec(ns, process.execPath, ['--import', tsx, CLI, '--mode', 'client', '--config', config, '--set', `client.server=${address}`], {
      allowFail: true,
      timeout: 30_000,
      env: { ...process.env, FORCE_COLOR: '0' },
    });
    assert.is(client.code, 1, client.stderr);
    assert.match(client.stderr, /DSHIELD_ERR_HANDSHAKE_TIMEOUT: .*client\.tun is on: TUN mode also needs server\.tun/);
    await withTimeout(
      new Promise<void>((resolve) => {
        const check = () => (/WARN .*refused "alice": it asks for TUN mode/.test(serverOut) ? resolve() : setTimeout(check, 50));
        check();
      }),
      5_000,
      `the server's warning; server output:\n${serverOut}`,
    );
    await stopChild(server);
  } finally {
    deleteNamespace(ns);
  }
});

test.run();
