/**
 * core/registry.ts: short names and paths to plugin files, the default-export
 * check, option checking against the plugin's schema, the plugin's context,
 * and one clear DshieldError(PLUGIN) line for each way it can go wrong.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { checkOptions, isPluginPath, listBuiltins, loadPlugin, resolvePluginFile, type PluginContextBase } from '../core/registry.ts';
import { DshieldError, ErrorCodes, type ErrorCode } from '../core/errors.ts';
import { EventBus } from '../core/events.ts';
import { createLogger } from '../core/log.ts';
import type { LogRecord, LoggerPlugin, Mode } from '../core/types.ts';
import { testConfig } from './helpers/context.ts';
import { tempDir } from './helpers/cli.ts';
import { seen } from './fixtures/registry/transport-echo.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const FIXTURES = join(ROOT, 'test', 'fixtures', 'registry');

function context(mode: Mode = 'client', records: LogRecord[] = []): PluginContextBase {
  const sink: LoggerPlugin = { name: 'capture', log: (r) => records.push(r) };
  return {
    mode,
    events: new EventBus(),
    signal: new AbortController().signal,
    config: testConfig(),
    baseDir: FIXTURES,
    log: createLogger([sink], 'core'),
  };
}

/** Runs fn, expecting a DshieldError with `code` whose one-line message matches `re`. */
async function rejects(fn: () => Promise<unknown>, code: ErrorCode, re: RegExp): Promise<DshieldError> {
  try {
    await fn();
  } catch (err) {
    assert.instance(err, DshieldError, `expected a DshieldError, got ${String(err)}`);
    const e = err as DshieldError;
    assert.is(e.code, code, e.message);
    assert.ok(re.test(e.message), `message ${JSON.stringify(e.message)} does not match ${re}`);
    assert.not.ok(e.message.includes('\n'), 'the message is one line');
    return e;
  }
  assert.unreachable('expected an error');
  throw new Error('unreachable');
}

test('listBuiltins mirrors the files in plugins/', () => {
  const files = readdirSync(join(ROOT, 'plugins')).filter((f) => f.endsWith('.ts'));
  const builtins = listBuiltins();
  assert.equal(Object.keys(builtins).sort(), ['auth', 'cipher', 'inbound', 'logger', 'outbound', 'transport']);
  for (const [kind, names] of Object.entries(builtins)) {
    const expected = files.filter((f) => f.startsWith(`${kind}-`)).map((f) => f.slice(kind.length + 1, -3)).sort();
    assert.equal(names, expected, kind);
  }
  // Names with hyphens keep them: the kind is only the first word.
  if (files.includes('cipher-chacha20-poly1305.ts')) assert.ok(builtins.cipher.includes('chacha20-poly1305'));
});

test('what counts as a path', () => {
  for (const p of ['./x.ts', '../x', 'plugins/x', 'x.ts', 'x.js', '.hidden', '/abs/x']) assert.ok(isPluginPath(p), p);
  for (const n of ['ws', 'chacha20-poly1305', 'tcp']) assert.not.ok(isPluginPath(n), n);
});

test('an unknown short name lists the built-ins and says how to use a file', async () => {
  const names = listBuiltins().transport.join(', ');
  const err = await rejects(
    () => loadPlugin('transport', { use: 'quic', options: {} }, context()),
    ErrorCodes.PLUGIN,
    /^unknown transport plugin "quic" \(built-in: .*\); to use your own, give a path like \.\/my-transport\.ts$/,
  );
  assert.ok(err.message.includes(`(built-in: ${names})`));
});

test('a path that does not exist is one clear line', async () => {
  await rejects(
    () => loadPlugin('transport', { use: './nope.ts', options: {} }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "\.\/nope\.ts": file not found \(looked for .*nope\.ts\)$/,
  );
});

test('a user plugin loads from a path relative to baseDir, with defaults and a "kind:name" logger', async () => {
  const records: LogRecord[] = [];
  const { def, instance } = await loadPlugin('transport', { use: './transport-echo.ts', options: {} }, context('client', records));
  assert.is(def.name, 'echo');
  assert.is(instance.name, 'echo');
  assert.equal(seen.options, { path: '/echo', connectTimeout: 5000, tags: ['a'] });
  assert.is(seen.ctx!.mode, 'client');
  assert.is(seen.ctx!.baseDir, FIXTURES);
  const created = records.find((r) => r.msg === 'created');
  assert.ok(created, 'the plugin logged through its context');
  assert.is(created!.scope, 'transport:echo');
});

test('defaults are copied per load: a plugin mutating one does not change the next', async () => {
  await loadPlugin('transport', { use: './transport-echo.ts', options: {} }, context());
  (seen.options!.tags as string[]).push('mutated');
  await loadPlugin('transport', { use: './transport-echo.ts', options: {} }, context());
  assert.equal(seen.options!.tags, ['a']);
});

test('unknown option names the plugin, the option and what it takes', async () => {
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { paht: '/x' } }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "echo": unknown option "paht" \(it takes: path, connectTimeout, tags, fail\)$/,
  );
});

test('wrong option type, failed validate() and a missing required option', async () => {
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { connectTimeout: 'soon' } }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "echo": option "connectTimeout" must be a number, got "soon"$/,
  );
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { tags: 'a,b' } }, context()),
    ErrorCodes.PLUGIN,
    /option "tags" must be a list of strings, got "a,b"$/,
  );
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { path: 'x' } }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "echo": option "path" must start with "\/"$/,
  );
  await rejects(
    () => loadPlugin('auth', { use: './required-option.ts', options: {} }, context('server')),
    ErrorCodes.PLUGIN,
    /^auth plugin "needs-token": option "token" is required: the token$/,
  );
});

test('a secret-named option is never echoed in an error', () => {
  const schema = { apiToken: { type: 'number' as const, description: 'n' } };
  try {
    checkOptions('auth plugin "x"', schema, { apiToken: 'hunter2' });
    assert.unreachable('should throw');
  } catch (err) {
    assert.is((err as DshieldError).message, 'auth plugin "x": option "apiToken" must be a number, got a string');
  }
});

test('option names from the environment match in any case; numbers become text where a string is wanted', () => {
  const schema = {
    connectTimeout: { type: 'number' as const, description: 'ms' },
    path: { type: 'string' as const, description: 'p' },
  };
  const out = checkOptions('transport plugin "x"', schema, { connecttimeout: 3000, path: 8080 });
  assert.equal(out, { connectTimeout: 3000, path: '8080' });
  // The case-folded one is the override (it came from the environment).
  assert.equal(checkOptions('x', schema, { connectTimeout: 1, CONNECTTIMEOUT: 2 }), { connectTimeout: 2 });
  assert.throws(() => checkOptions('x', {}, { a: 1 }), /unknown option "a" \(it takes no options\)/);
});

test('a plugin of another kind used as a transport', async () => {
  await rejects(
    () => loadPlugin('transport', { use: './cipher-fake.ts', options: {} }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "\.\/cipher-fake\.ts": is a cipher plugin, but it is used as a transport plugin$/,
  );
});

test('a file without a default export', async () => {
  await rejects(
    () => loadPlugin('transport', { use: './no-default.ts', options: {} }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "\.\/no-default\.ts": the default export must be definePlugin/,
  );
});

test('a file that does not compile is reported in one line', async () => {
  const tmp = tempDir();
  try {
    writeFileSync(join(tmp.dir, 'broken.ts'), "export default { kind: 'transport', name: 'broken'\n");
    await rejects(
      () => loadPlugin('transport', { use: './broken.ts', options: {} }, { ...context(), baseDir: tmp.dir }),
      ErrorCodes.PLUGIN,
      /^transport plugin "\.\/broken\.ts": cannot load .*broken\.ts: /,
    );
  } finally {
    tmp.cleanup();
  }
});

test('a plugin for the other mode is refused', async () => {
  await rejects(
    () => loadPlugin('auth', { use: './required-option.ts', options: { token: 't' } }, context('client')),
    ErrorCodes.PLUGIN,
    /^auth plugin "needs-token" runs only in server mode, not in client mode$/,
  );
});

test('errors from create() are wrapped with the plugin name; a DshieldError keeps its code', async () => {
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { fail: 'plain' } }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "echo": boom$/,
  );
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { fail: 'dshield' } }, context()),
    ErrorCodes.LISTEN,
    /^transport plugin "echo": port taken$/,
  );
  await rejects(
    () => loadPlugin('transport', { use: './transport-echo.ts', options: { fail: 'nothing' } }, context()),
    ErrorCodes.PLUGIN,
    /^transport plugin "echo": create\(\) returned an object without listen, dial\(\)/,
  );
});

test('a built-in short name resolves to plugins/<kind>-<name>.ts and loads', async () => {
  const file = resolvePluginFile('cipher', 'chacha20-poly1305', '/nowhere');
  assert.is(file, join(ROOT, 'plugins', 'cipher-chacha20-poly1305.ts'));
  const { instance } = await loadPlugin('cipher', { use: 'chacha20-poly1305', options: {} }, context());
  assert.is(instance.noiseName, 'ChaChaPoly');
});

test.run();
