/**
 * Compliance suite for auth plugins: every plugins/auth-*.ts file gets the
 * shared checks (client-key authorization, malformed entries refused at
 * create, client mode), then each built-in gets its psk() checks.
 * A new auth file fails the "covered" test until it has a harness here.
 */
import { chmodSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { checkPluginDefinition } from '../../core/define.ts';
import { ErrorCodes, isDshieldError } from '../../core/errors.ts';
import { encodeKey } from '../../core/keys.ts';
import type { AuthPlugin, ClientEntry, Logger, PluginContext, PluginDefinition } from '../../core/types.ts';
import { generateKeyPair } from '../../core/x25519.ts';
import { testConfig, testContext } from '../helpers/context.ts';

const PLUGIN_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
const authFiles = readdirSync(PLUGIN_DIR).filter((f) => /^auth-.+\.ts$/.test(f)).sort();

const definitions = new Map<string, PluginDefinition<'auth'>>();
for (const file of authFiles) {
  const mod = (await import(join(PLUGIN_DIR, file))) as { default: unknown };
  definitions.set(file, checkPluginDefinition(mod.default, 'auth', file));
}

const SHARED_PSK = Buffer.alloc(32, 0x5a);

/** What an auth plugin needs beyond the client list to be created. */
interface Harness {
  baseOptions(): Record<string, unknown>;
}

const harnesses: Record<string, Harness> = {
  keys: { baseOptions: () => ({}) },
  psk: { baseOptions: () => ({ psk: SHARED_PSK.toString('base64') }) },
};

function newKey(): { raw: Buffer; base64: string } {
  const { publicKey } = generateKeyPair();
  return { raw: publicKey, base64: encodeKey(publicKey) };
}

interface Captured {
  level: string;
  msg: string;
}

function capturingLogger(into: Captured[]): Logger {
  const log: Logger = {
    debug: (msg) => void into.push({ level: 'debug', msg }),
    info: (msg) => void into.push({ level: 'info', msg }),
    warn: (msg) => void into.push({ level: 'warn', msg }),
    error: (msg) => void into.push({ level: 'error', msg }),
    child: () => log,
  };
  return log;
}

function contextWith(clients: unknown[], extra: Partial<PluginContext> = {}): PluginContext {
  const config = testConfig();
  config.server.clients = clients as ClientEntry[];
  return testContext({ config, ...extra });
}

async function expectKeyError(make: () => unknown, mentions: RegExp[], what: string): Promise<Error> {
  try {
    await make();
  } catch (err) {
    assert.ok(isDshieldError(err, ErrorCodes.KEY), `${what}: expected DshieldError(KEY), got ${String(err)}`);
    for (const re of mentions) assert.match((err as Error).message, re, `${what}: message mentions ${re}`);
    return err as Error;
  }
  assert.unreachable(`${what}: create succeeded`);
  throw new Error('unreachable');
}

function withTempDir<T>(body: (dir: string) => Promise<T>): Promise<T> {
  const dir = mkdtempSync(join(tmpdir(), 'dshield-auth-'));
  return body(dir).finally(() => rmSync(dir, { recursive: true, force: true }));
}

// ---------------------------------------------------------------------------

const coverage = suite('auth plugins: coverage');

coverage('the built-in auth plugins are found', () => {
  assert.ok(authFiles.includes('auth-keys.ts'));
  assert.ok(authFiles.includes('auth-psk.ts'));
});

coverage('every auth-*.ts has a harness in this suite', () => {
  for (const [file, def] of definitions) {
    assert.is(`auth-${def.name}.ts`, file, `${file}: name matches the file name`);
    assert.ok(harnesses[def.name], `${file} has no harness in test/compliance/auth.test.ts: add one`);
  }
});

coverage.run();

// ---------------------------------------------------------------------------

for (const [file, def] of definitions) {
  const harness = harnesses[def.name];
  if (!harness) continue;
  const t = suite(`auth compliance: ${file}`);
  const create = async (clients: unknown[], options: Record<string, unknown> = {}, extra: Partial<PluginContext> = {}) =>
    (await def.create({ ...harness.baseOptions(), ...options }, contextWith(clients, extra))) as AuthPlugin;

  t('an authorized key gives its identity; an unknown key gives null', async () => {
    const alice = newKey();
    const bob = newKey();
    const stranger = newKey();
    const auth = await create([
      { name: 'alice', publicKey: alice.base64 },
      { name: 'bob', publicKey: bob.base64 },
    ]);
    assert.equal(auth.authorize(alice.raw), { name: 'alice', publicKey: alice.base64 });
    assert.equal(auth.authorize(bob.raw), { name: 'bob', publicKey: bob.base64 });
    assert.is(auth.authorize(stranger.raw), null);
    await auth.close?.();
  });

  t('keys that are not 32 bytes are refused, not thrown on', async () => {
    const alice = newKey();
    const auth = await create([{ name: 'alice', publicKey: alice.base64 }]);
    assert.is(auth.authorize(alice.raw.subarray(0, 31)), null);
    assert.is(auth.authorize(Buffer.concat([alice.raw, Buffer.alloc(1)])), null);
    assert.is(auth.authorize(Buffer.alloc(0)), null);
    assert.is(auth.authorize(undefined as unknown as Buffer), null);
  });

  t('option "clients" adds clients; an entry listed in both places is fine', async () => {
    const alice = newKey();
    const carol = newKey();
    const auth = await create([{ name: 'alice', publicKey: alice.base64 }], {
      clients: [
        { name: 'carol', publicKey: carol.base64 },
        { name: 'alice', publicKey: alice.base64 },
      ],
    });
    assert.is(auth.authorize(carol.raw)?.name, 'carol');
    assert.is(auth.authorize(alice.raw)?.name, 'alice');
  });

  t('a key with surrounding whitespace still matches (as read from a file)', async () => {
    const alice = newKey();
    const auth = await create([{ name: 'alice', publicKey: ` ${alice.base64}\n` }]);
    assert.equal(auth.authorize(alice.raw), { name: 'alice', publicKey: alice.base64 });
  });

  t('a malformed client entry is refused at create with DshieldError(KEY) naming it', async () => {
    const good = newKey();
    const cases: { clients: unknown[]; mentions: RegExp[]; what: string }[] = [
      { clients: [{ name: 'dave', publicKey: 'not-a-key' }], mentions: [/dave/, /server\.clients\[0\]/], what: 'garbage key' },
      {
        clients: [{ name: 'ok', publicKey: good.base64 }, { name: 'erin', publicKey: Buffer.alloc(31).toString('base64') }],
        mentions: [/erin/, /server\.clients\[1\]/],
        what: '31-byte key',
      },
      { clients: [{ name: 'frank' }], mentions: [/frank/, /publicKey/], what: 'missing key' },
      { clients: [{ publicKey: good.base64 }], mentions: [/server\.clients\[0\]/, /name/], what: 'missing name' },
      { clients: ['just a string'], mentions: [/server\.clients\[0\]/], what: 'not an object' },
      {
        clients: [{ name: 'gina', publicKey: good.base64 }, { name: 'hank', publicKey: good.base64 }],
        mentions: [/gina/, /hank/, /same public key/],
        what: 'one key, two names',
      },
    ];
    for (const c of cases) await expectKeyError(() => create(c.clients), c.mentions, c.what);
    await expectKeyError(
      () => create([], { clients: [{ name: 'ivan', publicKey: 'AAAA' }] }),
      [/ivan/, /clients/],
      'malformed option entry',
    );
  });

  t('the error for a malformed key does not quote the key', async () => {
    const almost = newKey().base64.slice(0, 40);
    const err = await expectKeyError(() => create([{ name: 'jo', publicKey: almost }]), [/jo/], 'truncated key');
    assert.not.ok(err.message.includes(almost));
  });

  t('no authorized client: a warning says every handshake will be refused', async () => {
    const logs: Captured[] = [];
    await create([], {}, { log: capturingLogger(logs) });
    assert.ok(logs.some((l) => l.level === 'warn' && /refused/.test(l.msg)), JSON.stringify(logs));
  });

  t('client mode: authorize() refuses everyone and the server list is not read', async () => {
    const alice = newKey();
    const auth = (await def.create(
      harness.baseOptions(),
      contextWith([{ name: 'alice', publicKey: alice.base64 }, { name: 'x', publicKey: 'broken' }], { mode: 'client' }),
    )) as AuthPlugin;
    assert.is(auth.authorize(alice.raw), null);
  });

  t.run();
}

// ---------------------------------------------------------------------------
// psk() semantics per plugin

const keysDef = definitions.get('auth-keys.ts');
if (keysDef) {
  const t = suite('auth keys: psk');
  t('psk() is undefined on both sides (plain IK)', async () => {
    const alice = newKey();
    const server = (await keysDef.create({}, contextWith([{ name: 'alice', publicKey: alice.base64 }]))) as AuthPlugin;
    assert.is(server.psk(alice.raw), undefined);
    assert.is(server.psk(), undefined);
    const client = (await keysDef.create({}, contextWith([], { mode: 'client' }))) as AuthPlugin;
    assert.is(client.psk(), undefined);
  });
  t.run();
}

const pskDef = definitions.get('auth-psk.ts');
if (pskDef) {
  const t = suite('auth psk: psk');
  const create = async (options: Record<string, unknown>, clients: unknown[] = [], extra: Partial<PluginContext> = {}) =>
    (await pskDef.create(options, contextWith(clients, extra))) as AuthPlugin;

  t('the psk option is required', () => {
    assert.ok(pskDef.options?.psk?.required, 'declared required');
  });

  t('the shared psk: 32 bytes, on the client (no argument) and for any client key on the server', async () => {
    const alice = newKey();
    const server = await create({ psk: SHARED_PSK.toString('base64') }, [{ name: 'alice', publicKey: alice.base64 }]);
    assert.equal(server.psk(alice.raw), SHARED_PSK);
    assert.equal(server.psk(newKey().raw), SHARED_PSK);
    assert.is(server.psk()!.length, 32);
    const client = await create({ psk: SHARED_PSK.toString('base64') }, [], { mode: 'client' });
    assert.equal(client.psk(), SHARED_PSK);
  });

  t('a per-client psk overrides the shared one for that client only', async () => {
    const alice = newKey();
    const bob = newKey();
    const bobPsk = Buffer.alloc(32, 0xb0);
    const server = await create(
      {
        psk: SHARED_PSK.toString('base64'),
        clients: [{ name: 'bob', publicKey: bob.base64, psk: bobPsk.toString('base64') }],
      },
      [{ name: 'alice', publicKey: alice.base64 }],
    );
    assert.equal(server.psk(bob.raw), bobPsk);
    assert.equal(server.psk(alice.raw), SHARED_PSK);
    assert.is(server.authorize(bob.raw)?.name, 'bob');
  });

  t('a per-client psk may be attached to a client of server.clients by repeating its entry', async () => {
    const alice = newKey();
    const alicePsk = Buffer.alloc(32, 0xa1);
    const server = await create(
      {
        psk: SHARED_PSK.toString('base64'),
        clients: [{ name: 'alice', publicKey: alice.base64, psk: alicePsk.toString('base64') }],
      },
      [{ name: 'alice', publicKey: alice.base64 }],
    );
    assert.equal(server.psk(alice.raw), alicePsk);
  });

  t('psk() returns a copy: wiping it does not change the next one', async () => {
    const server = await create({ psk: SHARED_PSK.toString('base64') });
    server.psk()!.fill(0);
    assert.equal(server.psk(), SHARED_PSK);
  });

  t('the file form: a path relative to baseDir holding the base64 psk', async () => {
    await withTempDir(async (dir) => {
      const filePsk = Buffer.alloc(32, 0x42);
      writeFileSync(join(dir, 'dshield.psk'), filePsk.toString('base64') + '\n', { mode: 0o600 });
      const bobPsk = Buffer.alloc(32, 0x43);
      writeFileSync(join(dir, 'bob.psk'), bobPsk.toString('base64'), { mode: 0o600 });
      const bob = newKey();
      const logs: Captured[] = [];
      const server = await create(
        { psk: 'dshield.psk', clients: [{ name: 'bob', publicKey: bob.base64, psk: './bob.psk' }] },
        [],
        { baseDir: dir, log: capturingLogger(logs) },
      );
      assert.equal(server.psk(), filePsk);
      assert.equal(server.psk(bob.raw), bobPsk);
      assert.not.ok(logs.some((l) => /readable/.test(l.msg)), 'no warning for a 0600 file');
    });
  });

  t('a psk file readable by others gives a warning', async () => {
    await withTempDir(async (dir) => {
      writeFileSync(join(dir, 'open.psk'), SHARED_PSK.toString('base64'));
      chmodSync(join(dir, 'open.psk'), 0o644);
      const logs: Captured[] = [];
      await create({ psk: 'open.psk' }, [], { baseDir: dir, log: capturingLogger(logs), mode: 'client' });
      assert.ok(logs.some((l) => l.level === 'warn' && /chmod 600/.test(l.msg)), JSON.stringify(logs));
    });
  });

  t('missing or malformed psk -> DshieldError(KEY) with the openssl hint, never quoting the value', async () => {
    await withTempDir(async (dir) => {
      writeFileSync(join(dir, 'short.psk'), Buffer.alloc(16).toString('base64'));
      const almost = SHARED_PSK.toString('base64').slice(0, 42);
      const cases: { options: Record<string, unknown>; mentions: RegExp[]; what: string; secret?: string }[] = [
        { options: {}, mentions: [/psk/, /openssl rand -base64 32/], what: 'missing' },
        { options: { psk: '' }, mentions: [/psk/, /openssl rand -base64 32/], what: 'empty' },
        { options: { psk: almost }, mentions: [/psk/, /32 bytes/, /openssl rand -base64 32/], what: 'a mistyped key', secret: almost },
        { options: { psk: 'no-such.psk' }, mentions: [/no-such\.psk/, /openssl rand -base64 32 > no-such\.psk/], what: 'a missing file' },
        { options: { psk: 'short.psk' }, mentions: [/short\.psk/, /32 bytes/], what: 'a file with 16 bytes' },
        {
          options: { psk: SHARED_PSK.toString('base64'), clients: [{ name: 'kim', publicKey: newKey().base64, psk: almost }] },
          mentions: [/kim/, /psk/],
          what: 'a malformed per-client psk',
          secret: almost,
        },
      ];
      for (const c of cases) {
        const err = await expectKeyError(() => create(c.options, [], { baseDir: dir }), c.mentions, c.what);
        if (c.secret) assert.not.ok(err.message.includes(c.secret), `${c.what}: the value is not quoted`);
      }
    });
  });

  t('two psks for one client are refused', async () => {
    const alice = newKey();
    await expectKeyError(
      () =>
        create({
          psk: SHARED_PSK.toString('base64'),
          clients: [
            { name: 'alice', publicKey: alice.base64, psk: Buffer.alloc(32, 1).toString('base64') },
            { name: 'alice', publicKey: alice.base64, psk: Buffer.alloc(32, 2).toString('base64') },
          ],
        }),
      [/alice/, /second psk/],
      'two psks',
    );
  });

  t.run();
}
