/**
 * core/config.ts and core/invite.ts: finding the file, the layers
 * (defaults < file < environment < invite < --set), validation with one-line
 * errors that name the key and where the value came from, key materialization,
 * the clients file, and invites end to end.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { listConfigKeys, loadConfig, RESERVED_ENV_NAMES, type LoadConfigOptions } from '../core/config.ts';
import { DshieldError, ErrorCodes, type ErrorCode } from '../core/errors.ts';
import { createInvite, decodeInvite, parseInvite } from '../core/invite.ts';
import { decodeKey, encodeKey } from '../core/keys.ts';
import { generateKeyPair, publicKeyFromPrivate } from '../core/x25519.ts';
import { tempDir } from './helpers/cli.ts';

const DEFINE_URL = pathToFileURL(fileURLToPath(new URL('../core/define.ts', import.meta.url))).href;
const KEY_A = encodeKey(generateKeyPair().publicKey);
const KEY_B = encodeKey(generateKeyPair().publicKey);

const temps: { cleanup(): void }[] = [];
function dir(): string {
  const t = tempDir('dshield-config-');
  temps.push(t);
  return t.dir;
}
test.after.each(() => {
  for (const t of temps.splice(0)) t.cleanup();
});

function writeJson(d: string, config: unknown, name = 'dshield.config.json'): string {
  const path = join(d, name);
  writeFileSync(path, JSON.stringify(config, null, 2));
  return path;
}

/** loadConfig in `cwd` with an empty environment and no key materialization unless asked. */
function load(cwd: string, opts: Partial<LoadConfigOptions> = {}) {
  return loadConfig({ cwd, env: {}, materializeKeys: false, ...opts });
}

async function fails(p: Promise<unknown>, code: ErrorCode, expected: string | RegExp): Promise<string> {
  try {
    await p;
  } catch (err) {
    assert.instance(err, DshieldError, String(err));
    const e = err as DshieldError;
    assert.is(e.code, code, e.message);
    assert.not.ok(e.message.includes('\n'), `one line: ${e.message}`);
    if (typeof expected === 'string') assert.is(e.message, expected);
    else assert.ok(expected.test(e.message), `${JSON.stringify(e.message)} does not match ${expected}`);
    return e.message;
  }
  throw new Error(`expected a ${code} error`);
}

// ---------------------------------------------------------------------------
// Finding the file, defaults

test('no config file: the built-in defaults', async () => {
  const d = dir();
  const c = await load(d);
  assert.is(c.source, null);
  assert.is(c.baseDir, d);
  assert.equal(c.transport, { use: 'tcp', options: {} });
  assert.equal(c.cipher, { use: 'chacha20-poly1305', options: {} });
  assert.equal(c.auth, { use: 'keys', options: {} });
  assert.is(c.hash, 'BLAKE2s');
  assert.equal(c.logging, [
    { use: 'console', options: { level: 'info' } },
    { use: 'file', options: { dir: 'logs' } },
  ]);
  assert.equal(c.server, {
    listen: '0.0.0.0:8443',
    privateKey: 'keys/server.key',
    clients: [],
    egress: { allow: [] },
    handshakeTimeout: 15000,
    handshakesPerSecond: 1000,
    handshakesPerSource: 20,
    clientsFile: join(d, 'keys', 'clients.json'),
    publicAddress: '',
    outbound: { use: 'direct', options: {} },
    tun: false,
  });
  assert.equal(c.client, {
    server: '127.0.0.1:8443',
    serverPublicKey: 'keys/server.pub',
    privateKey: 'keys/client.key',
    socks: { listen: '127.0.0.1:1080' },
    http: { listen: '127.0.0.1:8080' },
    connectWait: 10000,
    keepalive: 25000,
    handshakeTimeout: 10000,
    tun: false,
  });
  assert.ok(listConfigKeys().includes('client.serverPublicKey'));
});

test('a .ts config is found by search, imported with defineConfig, relative to its directory', async () => {
  const d = dir();
  writeFileSync(
    join(d, 'dshield.config.ts'),
    `import { defineConfig } from ${JSON.stringify(DEFINE_URL)};\n` +
      `export default defineConfig({ transport: { use: 'ws', path: '/t' }, server: { listen: '127.0.0.1:9000' } });\n`,
  );
  const c = await load(d);
  assert.is(c.source, join(d, 'dshield.config.ts'));
  assert.is(c.baseDir, d);
  assert.equal(c.transport, { use: 'ws', options: { path: '/t' } });
  assert.is(c.server.listen, '127.0.0.1:9000');
  assert.is(c.cipher.use, 'chacha20-poly1305', 'unset keys keep their defaults');
});

test('a .json config by search and by path; a .mjs by path; a missing path', async () => {
  const d = dir();
  writeJson(d, { hash: 'SHA256' });
  assert.is((await load(d)).hash, 'SHA256');

  const other = dir();
  const sub = join(other, 'etc');
  mkdirSync(sub);
  const path = writeJson(sub, { client: { server: 'vpn.example.com:443' } }, 'my.json');
  const c = await load(d, { configPath: path });
  assert.is(c.source, path);
  assert.is(c.baseDir, sub, 'relative paths resolve against the file, not the cwd');
  assert.is(c.client.server, 'vpn.example.com:443');
  assert.is(c.hash, 'BLAKE2s', 'the searched file is not read when a path is given');

  writeFileSync(join(sub, 'c.mjs'), 'export default { cipher: "aes-256-gcm" };\n');
  assert.is((await load(d, { configPath: join(sub, 'c.mjs') })).cipher.use, 'aes-256-gcm');

  const ts = join(sub, 'c.ts');
  writeFileSync(ts, 'const port: number = 9999;\nexport default { server: { listen: `127.0.0.1:${port}` } };\n');
  assert.is((await load(d, { configPath: ts })).server.listen, '127.0.0.1:9999');

  await fails(load(d, { configPath: 'nope.json' }), ErrorCodes.CONFIG, /^config file nope\.json does not exist/);
});

test('a config file that does not parse or exports nothing useful', async () => {
  const d = dir();
  writeFileSync(join(d, 'dshield.config.json'), '{ "transport": ');
  await fails(load(d), ErrorCodes.CONFIG, /dshield\.config\.json: cannot read the config: /);
  const e = dir();
  writeFileSync(join(e, 'dshield.config.ts'), 'export const x = 1;\n');
  await fails(load(e), ErrorCodes.CONFIG, /dshield\.config\.ts: has no default export; write export default defineConfig/);
  const f = dir();
  writeFileSync(join(f, 'dshield.config.json'), '[1, 2]');
  await fails(load(f), ErrorCodes.CONFIG, /the config must be an object/);
});

// ---------------------------------------------------------------------------
// Layers

test('precedence: defaults < file < environment < --set', async () => {
  const d = dir();
  writeJson(d, { client: { server: 'file.example:1', keepalive: 1000, connectWait: 2000 }, hash: 'SHA256' });
  const c = await load(d, {
    env: { DSHIELD_CLIENT__SERVER: 'env.example:2', DSHIELD_CLIENT__KEEPALIVE: '3000' },
    sets: ['client.server=set.example:3'],
  });
  assert.is(c.client.server, 'set.example:3', '--set beats the environment');
  assert.is(c.client.keepalive, 3000, 'the environment beats the file (and "3000" is JSON: a number)');
  assert.is(c.client.connectWait, 2000, 'the file beats the defaults');
  assert.is(c.hash, 'SHA256');
  assert.is(c.client.handshakeTimeout, 10000);
});

test('environment names match keys in any case; JSON values; text where a string is wanted', async () => {
  const d = dir();
  const c = await load(d, {
    env: {
      DSHIELD_CLIENT__SERVERPUBLICKEY: KEY_A,
      dshield_transport: 'ws',
      DSHIELD_SERVER__EGRESS__ALLOW: '["127.0.0.0/8", "fd00::/8"]',
      DSHIELD_SERVER__CLIENTSFILE: '8443',
      DSHIELD_CLIENT__HTTP: 'false',
      DSHIELD_HASH: 'sha256',
      DSHIELD_SERVER__HANDSHAKESPERSECOND: '5000',
      DSHIELD_SERVER__HANDSHAKESPERSOURCE: '200',
      PATH: '/usr/bin',
    },
  });
  assert.is(c.server.handshakesPerSecond, 5000);
  assert.is(c.server.handshakesPerSource, 200);
  assert.is(c.client.serverPublicKey, KEY_A);
  assert.equal(c.transport, { use: 'ws', options: {} });
  assert.equal(c.server.egress.allow, ['127.0.0.0/8', 'fd00::/8']);
  assert.is(c.server.clientsFile, join(d, '8443'), 'a JSON number for a string key is taken as its text');
  assert.is(c.client.http, false);
  assert.is(c.hash, 'SHA256');
});

test('plugin options through the environment and --set turn a name into { use, options }', async () => {
  const d = dir();
  writeJson(d, { transport: 'ws', cipher: { use: 'x', someOption: 1 }, logging: [{ use: 'console' }, { use: 'file', dir: 'logs' }] });
  const c = await load(d, {
    env: { DSHIELD_TRANSPORT__PATH: '/tunnel', DSHIELD_CIPHER__SOMEOPTION: '2', DSHIELD_LOGGING__FILE__MAXFILES: '3' },
    sets: ['logging.console.level=debug', 'logging.0.color=false', 'client.socks.listen=127.0.0.1:1081', 'client.socks.udp=false'],
  });
  assert.equal(c.transport, { use: 'ws', options: { path: '/tunnel' } });
  assert.equal(c.cipher.options, { someOption: 2 }, 'an existing option is matched in any case');
  assert.equal(c.logging, [
    { use: 'console', options: { level: 'debug', color: false } },
    { use: 'file', options: { dir: 'logs', maxfiles: 3 } },
  ]);
  assert.equal(c.client.socks, { listen: '127.0.0.1:1081', udp: false });

  // Naming the same plugin again keeps nothing of the old ref: a new name means new options.
  const again = await load(d, { env: { DSHIELD_TRANSPORT__PATH: '/a' }, sets: ['transport=tcp'] });
  assert.equal(again.transport, { use: 'tcp', options: {} });
  const whole = await load(d, { sets: ['transport={"use":"ws","path":"/b"}'] });
  assert.equal(whole.transport, { use: 'ws', options: { path: '/b' } });
});

test('unknown DSHIELD_* variables are errors that name the variable; reserved ones are ignored', async () => {
  const d = dir();
  await fails(load(d, { env: { DSHIELD_CLIENT__SERVR: 'x:1' } }), ErrorCodes.CONFIG, 'DSHIELD_CLIENT__SERVR: no config key client.servr (did you mean DSHIELD_CLIENT__SERVER?)');
  await fails(load(d, { env: { DSHIELD_CLIENT_SERVER: 'x:1' } }), ErrorCodes.CONFIG, /^DSHIELD_CLIENT_SERVER: no config key .*did you mean DSHIELD_CLIENT__SERVER\?/);
  await fails(load(d, { env: { DSHIELD_BOGUS: '1' } }), ErrorCodes.CONFIG, /^DSHIELD_BOGUS: no config key bogus$/);
  await fails(load(d, { sets: ['server.listne=1.2.3.4:5'] }), ErrorCodes.CONFIG, '--set server.listne: no config key server.listne (did you mean server.listen?)');
  await fails(load(d, { sets: ['server.listen'] }), ErrorCodes.CONFIG, /^--set server\.listen: expected key\.path=value/);
  await fails(load(d, { sets: ['server.listen.port=1'] }), ErrorCodes.CONFIG, /server\.listen is a single value; it has no part "port"/);

  const env: NodeJS.ProcessEnv = { DSHIELD_TEST_VERBOSE: '1', DSHIELD_CLIENT__SERVER: '' };
  for (const name of RESERVED_ENV_NAMES) env[name] = 'whatever';
  assert.ok(RESERVED_ENV_NAMES.includes('DSHIELD_INVITE'));
  const c = await load(d, { env });
  assert.is(c.client.server, '127.0.0.1:8443', 'an empty variable counts as unset');
});

// ---------------------------------------------------------------------------
// Validation

test('every kind of bad setting is one CONFIG line naming the key and the origin', async () => {
  const cases: [unknown, string | RegExp][] = [
    [{ server: { listne: '1.2.3.4:5' } }, /^unknown key "server\.listne" \(did you mean "server\.listen"\?\) \(in .*dshield\.config\.json\)$/],
    [{ listen: '1.2.3.4:5' }, /^unknown key "listen" \(did you mean "server\.listen"\?\)/],
    [{ client: { socks: 1080 } }, /^client\.socks: expected "host:port" or false, got 1080 \(in .*\)$/],
    [{ client: { server: 'nohost' } }, /^client\.server: "nohost" has no port/],
    [{ server: { listen: '::1:8443' } }, /^server\.listen: .*IPv6 address without brackets/],
    [{ server: { listen: '127.0.0.1:99999' } }, /^server\.listen: .*above 65535/],
    [{ server: { egress: { allow: ['10.0.0.0/8', '10.0.0.0/33'] } } }, /^server\.egress\.allow\[1\]: invalid address range "10\.0\.0\.0\/33"/],
    [{ server: { egress: { allow: '10.0.0.0/8' } } }, /^server\.egress\.allow: expected a list of address ranges/],
    [{ server: { handshakeTimeout: '15s' } }, /^server\.handshakeTimeout: expected a whole number of milliseconds .*got "15s"/],
    [{ server: { handshakesPerSecond: 0 } }, /^server\.handshakesPerSecond: expected a whole number per second \(1 to 1000000\), got 0/],
    [{ server: { handshakesPerSource: 2.5 } }, /^server\.handshakesPerSource: expected a whole number per second .*got 2\.5/],
    [{ server: { clients: [{ name: 'a', publicKey: KEY_A }, { name: 'a', publicKey: KEY_B }] } }, /^server\.clients\[1\]: duplicate client name "a"/],
    [{ server: { clients: [{ name: 'a' }] } }, /^server\.clients\[0\]: "publicKey" must be/],
    [{ server: { clients: [{ name: 'a', publicKey: KEY_A, pubkey: 'x' }] } }, /^server\.clients\[0\]: unknown field "pubkey"/],
    [{ logging: { use: 'console' } }, /^logging: expected a list of plugins/],
    [{ logging: [{ level: 'debug' }] }, /^logging\[0\]: expected \{ use: "name", \.\.\.options \}/],
    [{ transport: 5 }, /^transport: expected a plugin name, a path, or \{ use: "name", \.\.\.options \}, got 5/],
    [{ hash: 'MD5' }, /^hash: expected one of "BLAKE2s", "SHA256", "BLAKE2b", "SHA512", got "MD5"/],
    [{ client: 'x' }, /^client: expected an object of settings, got "x"/],
    [{ client: { server: 'http://x:1' } }, /^client\.server: expected "host:port" or a ws:\/\/ or wss:\/\/ URL/],
  ];
  for (const [config, expected] of cases) {
    const d = dir();
    writeJson(d, config);
    await fails(load(d), ErrorCodes.CONFIG, expected);
  }
  // A later layer may fix a bad value: the check is on what is left at the end.
  const fixable = dir();
  writeJson(fixable, { client: { socks: 1080 } });
  assert.equal((await load(fixable, { sets: ['client.socks=127.0.0.1:1081'] })).client.socks, { listen: '127.0.0.1:1081' });
  await fails(load(fixable, { sets: ['client.socks.udp=false'] }), ErrorCodes.CONFIG, /^client\.socks: expected "host:port" or false, got 1080/);

  // The origin is named for the environment and --set too.
  const d = dir();
  await fails(load(d, { env: { DSHIELD_CLIENT__SOCKS: '1080' } }), ErrorCodes.CONFIG, /^client\.socks: .* \(from DSHIELD_CLIENT__SOCKS\)$/);
  await fails(load(d, { sets: ['server.egress.allow=10.0.0/8'] }), ErrorCodes.CONFIG, /^server\.egress\.allow\[0\]: .* \(from --set server\.egress\.allow\)$/);
});

test('ws URLs are fine for client.server; a comma list works for egress from the command line', async () => {
  const d = dir();
  const c = await load(d, { sets: ['client.server=wss://vpn.example.com/tunnel', 'server.egress.allow=10.0.0.0/8, 192.168.1.0/24'] });
  assert.is(c.client.server, 'wss://vpn.example.com/tunnel');
  assert.equal(c.server.egress.allow, ['10.0.0.0/8', '192.168.1.0/24']);
});

test('a malformed inline key is a KEY error that does not quote it', async () => {
  const d = dir();
  // Fixed, not random: a truncated key that happened to start with "/" would read as an absolute path.
  const bad = Buffer.alloc(32, 7).toString('base64').slice(0, 42);
  writeJson(d, { client: { privateKey: bad } });
  const msg = await fails(load(d), ErrorCodes.KEY, /^client\.privateKey: not a key .* \(in .*\)$/);
  assert.not.ok(msg.includes(bad));
  const fromSet = await fails(load(d, { sets: [`client.privateKey=${bad}`] }), ErrorCodes.KEY, /^client\.privateKey: not a key .* \(from --set client\.privateKey\)$/);
  assert.not.ok(fromSet.includes(bad));
  const typo = await fails(load(d, { sets: [`client.privatekye=${bad}`] }), ErrorCodes.CONFIG, /^--set client\.privatekye: no config key/);
  assert.not.ok(typo.includes(bad));
  const e = dir();
  writeJson(e, { server: { clients: [{ name: 'a', publicKey: 'AAAA' + KEY_A.slice(4, 40) }] } });
  await fails(load(e), ErrorCodes.KEY, /^server\.clients\[0\]\.publicKey: not a public key/);
});

// ---------------------------------------------------------------------------
// Keys

test('materializing: the shipped layout creates server and client key pairs 0600 on first run', async () => {
  const d = dir();
  writeJson(d, { server: { listen: '127.0.0.1:8443', clients: [{ name: 'local', publicKey: 'keys/client.pub' }] } });
  const c = await load(d, { materializeKeys: true });
  const serverKey = decodeKey(c.server.privateKey, 'server.privateKey');
  const clientKey = decodeKey(c.client.privateKey, 'client.privateKey');
  assert.is(c.client.serverPublicKey, encodeKey(publicKeyFromPrivate(serverKey)), 'the client pins the server key');
  assert.equal(c.server.clients, [{ name: 'local', publicKey: encodeKey(publicKeyFromPrivate(clientKey)) }]);
  for (const f of ['server.key', 'client.key']) assert.is(statSync(join(d, 'keys', f)).mode & 0o777, 0o600, f);
  for (const f of ['server.pub', 'client.pub']) assert.ok(existsSync(join(d, 'keys', f)), f);

  const again = await load(d, { materializeKeys: true });
  assert.is(again.server.privateKey, c.server.privateKey, 'the second start reads the same keys');
  assert.is(again.client.privateKey, c.client.privateKey);
});

test('a client alone with no server key gets the actionable message; it creates no server key', async () => {
  const d = dir();
  await fails(
    load(d, { materializeKeys: 'client' }),
    ErrorCodes.KEY,
    "client.serverPublicKey: keys/server.pub does not exist: start the server once on this machine to create it, or set the server's public key",
  );
  assert.ok(existsSync(join(d, 'keys', 'client.key')), 'its own key is created');
  assert.not.ok(existsSync(join(d, 'keys', 'server.key')), 'no server key is made on a client');
});

test('a key file with garbage names the key and the file', async () => {
  const d = dir();
  mkdirSync(join(d, 'keys'));
  writeFileSync(join(d, 'keys', 'server.key'), 'not a key\n');
  await fails(load(d, { materializeKeys: 'server' }), ErrorCodes.KEY, /^server\.privateKey \(.*server\.key\): not a key/);
});

test('without materializing, paths stay as written and nothing is created', async () => {
  const d = dir();
  const c = await load(d);
  assert.is(c.server.privateKey, 'keys/server.key');
  assert.not.ok(existsSync(join(d, 'keys')));
});

test('the clients file is merged; a name in both places is refused', async () => {
  const d = dir();
  mkdirSync(join(d, 'keys'));
  writeFileSync(join(d, 'keys', 'clients.json'), JSON.stringify([{ name: 'laptop', publicKey: KEY_B }]));
  writeJson(d, { server: { clients: [{ name: 'phone', publicKey: KEY_A }] } });
  const c = await load(d);
  assert.equal(c.server.clients, [
    { name: 'phone', publicKey: KEY_A },
    { name: 'laptop', publicKey: KEY_B },
  ]);
  writeJson(d, { server: { clients: [{ name: 'laptop', publicKey: KEY_A }] } });
  await fails(load(d), ErrorCodes.CONFIG, /^server\.clients: "laptop" is listed in the config and again in .*clients\.json/);
  writeJson(d, { server: { clients: [{ name: 'other', publicKey: KEY_B }] } });
  await fails(load(d), ErrorCodes.KEY, /^server\.clients: "other" and "laptop" have the same public key/);
});

// ---------------------------------------------------------------------------
// Invites

test('invite round trip: createInvite -> parseInvite -> loadConfig({ invite })', async () => {
  const serverDir = dir();
  writeJson(serverDir, {
    transport: { use: 'ws', path: '/t' },
    cipher: 'aes-256-gcm',
    hash: 'SHA256',
    server: { listen: '127.0.0.1:9443' },
  });
  const server = await load(serverDir, { materializeKeys: 'server' });
  const { invite, client, privateKey } = createInvite(server, 'laptop');
  assert.ok(invite.startsWith('dshield://'));
  assert.is(client.publicKey, encodeKey(publicKeyFromPrivate(decodeKey(privateKey, 'k'))));
  const file = join(serverDir, 'keys', 'clients.json');
  assert.is(statSync(file).mode & 0o777, 0o600);
  assert.equal(JSON.parse(readFileSync(file, 'utf8')), [client]);

  const layer = parseInvite(invite);
  assert.equal(layer.transport, { use: 'ws', path: '/t' });
  assert.is(layer.cipher, 'aes-256-gcm');
  assert.is(layer.hash, 'SHA256');
  assert.is(layer.client!.server, '127.0.0.1:9443');
  assert.is(decodeInvite(invite).name, 'laptop');

  // A client machine: an empty directory, only the invite (and an env override below --invite).
  const clientDir = dir();
  const c = await loadConfig({ cwd: clientDir, env: { DSHIELD_TRANSPORT__PATH: '/ignored' }, invite, materializeKeys: 'client' });
  assert.equal(c.transport, { use: 'ws', options: { path: '/t' } }, 'the invite is above the environment');
  assert.is(c.client.serverPublicKey, encodeKey(publicKeyFromPrivate(decodeKey(server.server.privateKey, 's'))));
  const clientPublic = encodeKey(publicKeyFromPrivate(decodeKey(c.client.privateKey, 'c')));
  const onServer = JSON.parse(readFileSync(file, 'utf8')) as { name: string; publicKey: string }[];
  assert.ok(onServer.some((e) => e.name === 'laptop' && e.publicKey === clientPublic), "the client's key is authorized");
  assert.not.ok(existsSync(join(clientDir, 'keys')), 'a client from an invite writes no key files');

  const reloaded = await load(serverDir, { materializeKeys: 'server' });
  assert.ok(reloaded.server.clients.some((e) => e.name === 'laptop' && e.publicKey === clientPublic));

  const withSet = await load(clientDir, { invite, sets: ['client.server=10.0.0.5:9443'] });
  assert.is(withSet.client.server, '10.0.0.5:9443', '--set is above the invite');

  assert.throws(() => createInvite(reloaded, 'laptop'), (e: unknown) => (e as DshieldError).code === ErrorCodes.CONFIG && /already exists/.test((e as Error).message));
  assert.throws(() => createInvite(reloaded, 'bad name!'), /client name must be/);
});

test('invites carry the psk; a wildcard listen needs publicAddress or an address', async () => {
  const d = dir();
  const psk = encodeKey(generateKeyPair().privateKey);
  writeJson(d, { auth: { use: 'psk', psk }, server: { listen: '0.0.0.0:8443' } });
  const server = await load(d, { materializeKeys: 'server' });
  assert.throws(
    () => createInvite(server, 'a'),
    (e: unknown) => (e as DshieldError).code === ErrorCodes.CONFIG && /^server\.publicAddress: .*--address/.test((e as Error).message),
  );
  const { invite } = createInvite(server, 'a', 'vpn.example.com:8443');
  const layer = parseInvite(invite);
  assert.equal(layer.auth, { use: 'psk', psk });
  assert.is(layer.client!.server, 'vpn.example.com:8443');
  const c = await load(dir(), { invite });
  assert.equal(c.auth, { use: 'psk', options: { psk } });

  const e = dir();
  writeJson(e, { server: { listen: '0.0.0.0:8443', publicAddress: 'wss://vpn.example.com/t' } });
  const s2 = await load(e, { materializeKeys: 'server' });
  assert.is(parseInvite(createInvite(s2, 'b').invite).client!.server, 'wss://vpn.example.com/t');
});

test('malformed invites are INVITE errors', async () => {
  const good = (() => {
    const payload = { v: 1, server: '1.2.3.4:5', serverPublicKey: KEY_A, transport: 'tcp', cipher: 'chacha20-poly1305', hash: 'BLAKE2s', privateKey: KEY_B };
    return (p: object) => 'dshield://' + Buffer.from(JSON.stringify({ ...payload, ...p })).toString('base64url');
  })();
  assert.is(parseInvite(good({})).client!.privateKey, KEY_B);
  const bad: [string, RegExp][] = [
    ['https://example.com', /starting with dshield:\/\//],
    ['dshield://!!!', /damaged/],
    ['dshield://' + Buffer.from('{"v":1').toString('base64url'), /damaged or cut short/],
    [good({ v: 2 }), /version 2/],
    [good({ server: 'nope' }), /"server"/],
    [good({ privateKey: 'short' }), /"privateKey" is missing or not a key/],
    [good({ hash: 'MD5' }), /"hash"/],
    [good({ transport: 7 }), /"transport"/],
  ];
  for (const [text, re] of bad) {
    try {
      parseInvite(text);
      assert.unreachable(text);
    } catch (err) {
      assert.is((err as DshieldError).code, ErrorCodes.INVITE, (err as Error).message);
      assert.match((err as Error).message, re);
      assert.not.ok((err as Error).message.includes(KEY_B), 'no secret in the message');
    }
  }
  await fails(load(dir(), { invite: 'dshield://x' }), ErrorCodes.INVITE, /^invite: /);
});

test.run();
