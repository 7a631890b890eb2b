/**
 * core/keys.ts: base64 keys, key references (inline or file), key files
 * created 0600 and atomically (several processes at once get one key),
 * and redaction of secrets.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  decodeKey,
  encodeKey,
  ensureKeyPair,
  isInlineKey,
  isSecretName,
  publicKeyPath,
  readKeyRef,
  redactConfig,
  writePrivateKeyFile,
} from '../core/keys.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { generateKeyPair, publicKeyFromPrivate } from '../core/x25519.ts';
import { tempDir } from './helpers/cli.ts';
import { withTimeout } from './helpers/timeout.ts';

const ENSURE_SCRIPT = fileURLToPath(new URL('./fixtures/keys/ensure-key.ts', import.meta.url));

function keyError(fn: () => unknown): DshieldError {
  try {
    fn();
  } catch (err) {
    assert.instance(err, DshieldError);
    assert.is((err as DshieldError).code, ErrorCodes.KEY);
    assert.not.ok((err as DshieldError).message.includes('\n'));
    return err as DshieldError;
  }
  throw new Error('expected a DshieldError(KEY)');
}

const modeOf = (path: string): number => statSync(path).mode & 0o777;

test('encodeKey / decodeKey round trip; bad keys are refused without echoing them', () => {
  const { privateKey } = generateKeyPair();
  const text = encodeKey(privateKey);
  assert.is(text.length, 44);
  assert.ok(decodeKey(`  ${text}\n`, 'k').equals(privateKey), 'whitespace around a key (as in key files) is fine');

  const short = encodeKey(Buffer.alloc(31, 7));
  const long = encodeKey(Buffer.alloc(33, 7));
  for (const bad of [short, long, text.slice(0, 43), 'not base64 at all!', '', text.replace(/.$/, '*')]) {
    const err = keyError(() => decodeKey(bad, 'client.privateKey'));
    assert.ok(err.message.startsWith('client.privateKey: not a key'), err.message);
    if (bad.length > 8) assert.not.ok(err.message.includes(bad), 'the bad value (maybe a secret) is not quoted');
  }
});

test('isInlineKey: keys and near-keys are keys, paths are paths', () => {
  const key = encodeKey(generateKeyPair().publicKey);
  assert.ok(isInlineKey(key));
  // Fixed, not random: a truncated key that happened to start with "/" would read as an absolute path.
  assert.ok(isInlineKey(encodeKey(Buffer.alloc(32, 7)).slice(0, 42)), 'a key that lost characters is a malformed key, not a file name');
  for (const p of ['keys/server.key', 'server.pub', '/home/someone/projects/dshield/keys/server', 'keys/client']) {
    assert.not.ok(isInlineKey(p), p);
  }
});

test('readKeyRef: inline, a file relative to baseDir, a missing file, a file with garbage', () => {
  const tmp = tempDir();
  try {
    const { privateKey } = generateKeyPair();
    assert.ok(readKeyRef(encodeKey(privateKey), '/nowhere', 'k').equals(privateKey));
    writeFileSync(join(tmp.dir, 'a.key'), encodeKey(privateKey) + '\n');
    assert.ok(readKeyRef('a.key', tmp.dir, 'k').equals(privateKey));

    const missing = keyError(() => readKeyRef('keys/none.key', tmp.dir, 'server.privateKey'));
    assert.is(missing.message, 'server.privateKey: keys/none.key does not exist');

    writeFileSync(join(tmp.dir, 'garbage.key'), 'hello world\n');
    const garbage = keyError(() => readKeyRef('garbage.key', tmp.dir, 'server.privateKey'));
    assert.match(garbage.message, /^server\.privateKey \(garbage\.key\): not a key/);

    // Fixed, not random: a truncated key that happened to start with "/" would read as an absolute path.
    const truncated = keyError(() => readKeyRef(encodeKey(Buffer.alloc(32, 7)).slice(0, 43), tmp.dir, 'client.privateKey'));
    assert.match(truncated.message, /^client\.privateKey: not a key/);
  } finally {
    tmp.cleanup();
  }
});

test('ensureKeyPair creates the private key 0600 in a 0700 directory and the .pub 0644', () => {
  const tmp = tempDir();
  try {
    const path = join(tmp.dir, 'keys', 'server.key');
    const first = ensureKeyPair(path);
    assert.ok(first.created);
    assert.is(modeOf(path), 0o600);
    assert.is(modeOf(join(tmp.dir, 'keys')), 0o700);
    const pub = join(tmp.dir, 'keys', 'server.pub');
    assert.is(publicKeyPath(path), pub);
    assert.is(modeOf(pub), 0o644);
    assert.ok(decodeKey(readFileSync(path, 'utf8'), 'file').equals(first.keyPair.privateKey));
    assert.ok(decodeKey(readFileSync(pub, 'utf8'), 'file').equals(publicKeyFromPrivate(first.keyPair.privateKey)));

    const again = ensureKeyPair(path);
    assert.not.ok(again.created);
    assert.ok(again.keyPair.privateKey.equals(first.keyPair.privateKey), 'an existing key is kept');

    unlinkSync(pub);
    ensureKeyPair(path);
    assert.ok(existsSync(pub), 'a lost .pub is restored from the private key');
    assert.equal(readdirSync(join(tmp.dir, 'keys')).sort(), ['server.key', 'server.pub'], 'no temporary files are left');

    writeFileSync(join(tmp.dir, 'bad.key'), 'garbage');
    keyError(() => ensureKeyPair(join(tmp.dir, 'bad.key'), 'client.privateKey'));
  } finally {
    tmp.cleanup();
  }
});

test('writePrivateKeyFile never overwrites', () => {
  const tmp = tempDir();
  try {
    const path = join(tmp.dir, 'client.key');
    const a = generateKeyPair();
    assert.ok(writePrivateKeyFile(path, a));
    assert.not.ok(writePrivateKeyFile(path, generateKeyPair()));
    assert.is(readFileSync(path, 'utf8').trim(), encodeKey(a.privateKey));
    assert.is(readFileSync(join(tmp.dir, 'client.pub'), 'utf8').trim(), encodeKey(a.publicKey));
  } finally {
    tmp.cleanup();
  }
});

test('several processes creating one key at once all end up with the same key', async () => {
  const tmp = tempDir();
  const children: ReturnType<typeof spawn>[] = [];
  try {
    const path = join(tmp.dir, 'keys', 'client.key');
    const runs = Array.from({ length: 3 }, () => {
      const child = spawn(process.execPath, ['--import', 'tsx', ENSURE_SCRIPT, path], { stdio: ['pipe', 'pipe', 'pipe'] });
      children.push(child);
      let out = '';
      let markReady: () => void;
      const ready = new Promise<void>((resolve) => (markReady = resolve));
      child.stdout!.on('data', (c: Buffer) => {
        out += c.toString();
        if (out.startsWith('ready\n')) markReady();
      });
      child.stderr!.on('data', (c: Buffer) => (out += c.toString()));
      const done = new Promise<string>((resolve, reject) =>
        child.on('exit', (code) => (code === 0 ? resolve(out.slice('ready\n'.length)) : reject(new Error(`child exited ${code}: ${out}`)))),
      );
      return { child, ready, done };
    });
    // Every child has loaded and waits on stdin: release them together so they race.
    await withTimeout(Promise.all(runs.map((r) => r.ready)), 30_000, 'the key-creating children to start');
    for (const r of runs) r.child.stdin!.write('go\n');
    const results = (await withTimeout(Promise.all(runs.map((r) => r.done)), 15_000, 'the key-creating children')).map(
      (o) => JSON.parse(o) as { publicKey: string; created: boolean },
    );
    const keys = new Set(results.map((r) => r.publicKey));
    assert.is(keys.size, 1, 'one key for everyone');
    assert.is(results.filter((r) => r.created).length, 1, 'exactly one process created it');
    const onDisk = decodeKey(readFileSync(path, 'utf8'), 'file');
    assert.is(encodeKey(publicKeyFromPrivate(onDisk)), [...keys][0]);
    assert.is(modeOf(path), 0o600);
    assert.equal(readdirSync(join(tmp.dir, 'keys')).sort(), ['client.key', 'client.pub']);
  } finally {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    tmp.cleanup();
  }
});

test('redactConfig hides private keys and psk-like options, keeps public keys', () => {
  const config = {
    auth: { use: 'psk', options: { psk: 'c2VjcmV0', clients: [{ name: 'a', publicKey: 'PUB', psk: 'S2' }] } },
    transport: { use: 'ws', options: { path: '/x', authToken: 't0k', password: 'pw', keepalive: 1 } },
    server: { privateKey: 'PRIV', clients: [{ name: 'a', publicKey: 'PUB' }] },
    client: { privateKey: 'PRIV2', serverPublicKey: 'SPUB', keepalive: 25000 },
  };
  const red = redactConfig(config);
  assert.equal(red, {
    auth: { use: 'psk', options: { psk: '<redacted>', clients: [{ name: 'a', publicKey: 'PUB', psk: '<redacted>' }] } },
    transport: { use: 'ws', options: { path: '/x', authToken: '<redacted>', password: '<redacted>', keepalive: 1 } },
    server: { privateKey: '<redacted>', clients: [{ name: 'a', publicKey: 'PUB' }] },
    client: { privateKey: '<redacted>', serverPublicKey: 'SPUB', keepalive: 25000 },
  });
  assert.is(config.server.privateKey, 'PRIV', 'the original is untouched');
  assert.ok(isSecretName('apiSecret') && isSecretName('hostKey') && !isSecretName('publicKey'));
});

test.run();
