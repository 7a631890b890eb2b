/**
 * Compliance suite for cipher plugins: every plugins/cipher-*.ts file is
 * loaded and must behave as the CipherPlugin contract (core/types.ts) says.
 * A new cipher file is picked up automatically.
 */
import { createCipheriv, randomBytes } from 'node:crypto';
import { readdirSync } from 'node:fs';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { join } from 'node:path';
import { suite, test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkPluginDefinition } from '../../core/define.ts';
import type { CipherPlugin } from '../../core/types.ts';
import { testContext } from '../helpers/context.ts';

const PLUGINS_DIR = fileURLToPath(new URL('../../plugins/', import.meta.url));
const files = readdirSync(PLUGINS_DIR).filter((f) => /^cipher-.+\.ts$/.test(f)).sort();

const TAG = 16;
const NODE_ALGORITHM: Record<string, string> = { ChaChaPoly: 'chacha20-poly1305', AESGCM: 'aes-256-gcm' };

/** The Noise nonce: 4 zero bytes, then the counter (ChaChaPoly little-endian, AESGCM big-endian). */
function noiseNonce(noiseName: string, counter: number): Buffer {
  const nonce = Buffer.alloc(12);
  if (noiseName === 'ChaChaPoly') nonce.writeBigUInt64LE(BigInt(counter), 4);
  else nonce.writeBigUInt64BE(BigInt(counter), 4);
  return nonce;
}

const loaded: { file: string; cipher: CipherPlugin }[] = [];
for (const file of files) {
  const mod = (await import(pathToFileURL(join(PLUGINS_DIR, file)).href)) as { default: unknown };
  const def = checkPluginDefinition(mod.default, 'cipher', file);
  assert.is(`cipher-${def.name}.ts`, file, 'the file is named after the plugin');
  const cipher = (await def.create({}, testContext())) as CipherPlugin;
  loaded.push({ file, cipher });
}

test('the suite covers every plugins/cipher-*.ts file, including both built-ins', () => {
  assert.equal(loaded.map((l) => l.file), files);
  assert.ok(files.includes('cipher-chacha20-poly1305.ts'));
  assert.ok(files.includes('cipher-aes-256-gcm.ts'));
});

for (const { file, cipher } of loaded) {
  const s = suite(`${file} (${cipher.noiseName})`);
  const key = randomBytes(32);

  s('name and noiseName', () => {
    assert.is(`cipher-${cipher.name}.ts`, file);
    assert.ok(['ChaChaPoly', 'AESGCM'].includes(cipher.noiseName), cipher.noiseName);
  });

  s('round trip at many sizes, with and without AD; output is ciphertext || 16-byte tag', () => {
    for (const size of [0, 1, 15, 16, 17, 255, 1000, 16 * 1024, 65535 - 16]) {
      for (const ad of [Buffer.alloc(0), randomBytes(32)]) {
        const pt = randomBytes(size);
        const ct = cipher.encrypt(key, 7, ad, pt);
        assert.is(ct.length, size + TAG);
        if (size >= 16) assert.not.ok(ct.subarray(0, size).equals(pt), 'ciphertext differs from plaintext');
        const back = cipher.decrypt(key, 7, ad, ct);
        assert.ok(back !== null && back.equals(pt), `size ${size}`);
      }
    }
  });

  s('known answer: matches node:crypto with the Noise nonce layout', () => {
    const algorithm = NODE_ALGORITHM[cipher.noiseName]!;
    const sizes = [1400, 16 * 1024, 65535 - 16];
    for (const [i, counter] of [0, 1, 255, 256, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 3, Number.MAX_SAFE_INTEGER].entries()) {
      const ad = Buffer.from('ad');
      const pt = i < sizes.length ? randomBytes(sizes[i]!) : Buffer.from(`counter ${counter}`);
      // Both AEADs share this API; the cast only picks one overload of createCipheriv.
      const c = createCipheriv(algorithm as 'aes-256-gcm', key, noiseNonce(cipher.noiseName, counter), { authTagLength: TAG });
      c.setAAD(ad, { plaintextLength: pt.length });
      const expected = Buffer.concat([c.update(pt), c.final(), c.getAuthTag()]);
      assert.is(cipher.encrypt(key, counter, ad, pt).toString('hex'), expected.toString('hex'), `counter ${counter}`);
    }
  });

  s('tampering with ciphertext, tag, AD, counter or key -> null', () => {
    const ad = Buffer.from('associated');
    const pt = randomBytes(100);
    const ct = cipher.encrypt(key, 42, ad, pt);
    for (let i = 0; i < ct.length; i++) {
      const bad = Buffer.from(ct);
      bad[i]! ^= 1 << (i % 8);
      assert.is(cipher.decrypt(key, 42, ad, bad), null, `flipped byte ${i} (${i >= 100 ? 'tag' : 'ciphertext'})`);
    }
    assert.is(cipher.decrypt(key, 42, Buffer.from('associatee'), ct), null, 'ad');
    assert.is(cipher.decrypt(key, 42, Buffer.alloc(0), ct), null, 'ad removed');
    assert.is(cipher.decrypt(key, 41, ad, ct), null, 'counter - 1');
    assert.is(cipher.decrypt(key, 43, ad, ct), null, 'counter + 1');
    assert.is(cipher.decrypt(key, 42 + 2 ** 32, ad, ct), null, 'counter high word');
    assert.is(cipher.decrypt(randomBytes(32), 42, ad, ct), null, 'key');
    assert.is(cipher.decrypt(key, 42, ad, ct.subarray(0, ct.length - 1)), null, 'truncated');
    assert.is(cipher.decrypt(key, 42, ad, Buffer.concat([ct, Buffer.alloc(1)])), null, 'extended');
    assert.ok(cipher.decrypt(key, 42, ad, ct)?.equals(pt), 'the original still decrypts');
  });

  s('distinct counters give distinct ciphertexts; the same counter is deterministic', () => {
    const pt = Buffer.alloc(64);
    const seen = new Set<string>();
    for (const counter of [0, 1, 2, 3, 2 ** 32, 2 ** 32 + 1, 2 ** 52, Number.MAX_SAFE_INTEGER - 1]) {
      const hex = cipher.encrypt(key, counter, Buffer.alloc(0), pt).toString('hex');
      assert.not.ok(seen.has(hex), `counter ${counter} repeats a ciphertext`);
      seen.add(hex);
      assert.is(cipher.encrypt(key, counter, Buffer.alloc(0), pt).toString('hex'), hex);
    }
  });

  s('counters near 2^53 work', () => {
    for (const counter of [2 ** 53 - 2, Number.MAX_SAFE_INTEGER, 2 ** 52 + 12345]) {
      const pt = randomBytes(33);
      const ct = cipher.encrypt(key, counter, Buffer.alloc(0), pt);
      assert.ok(cipher.decrypt(key, counter, Buffer.alloc(0), ct)?.equals(pt), `counter ${counter}`);
      assert.is(cipher.decrypt(key, counter - 1, Buffer.alloc(0), ct), null);
    }
  });

  s('empty plaintext: a 16-byte tag that authenticates', () => {
    const ct = cipher.encrypt(key, 0, Buffer.from('x'), Buffer.alloc(0));
    assert.is(ct.length, TAG);
    const pt = cipher.decrypt(key, 0, Buffer.from('x'), ct);
    assert.ok(pt !== null && pt.length === 0);
    assert.is(cipher.decrypt(key, 0, Buffer.from('y'), ct), null);
  });

  s('outputs are independent buffers (no shared scratch leaks between calls)', () => {
    const pt = Buffer.from('same plaintext');
    const first = cipher.encrypt(key, 1, Buffer.alloc(0), pt);
    const copy = Buffer.from(first);
    cipher.encrypt(key, 2, Buffer.alloc(0), pt);
    cipher.decrypt(key, 1, Buffer.alloc(0), first);
    assert.ok(first.equals(copy));
    pt.fill(0);
    assert.ok(cipher.decrypt(key, 1, Buffer.alloc(0), first)?.equals(Buffer.from('same plaintext')));
  });

  s('decrypt of short, empty, garbage or malformed input returns null and never throws', () => {
    for (const input of [Buffer.alloc(0), Buffer.alloc(1), Buffer.alloc(15), Buffer.alloc(16), randomBytes(16), randomBytes(17)]) {
      assert.is(cipher.decrypt(key, 0, Buffer.alloc(0), input), null, `${input.length} bytes`);
    }
    for (let i = 0; i < 500; i++) {
      const garbage = randomBytes(Math.floor(Math.random() * 200));
      assert.is(cipher.decrypt(key, i, randomBytes(i % 20), garbage), null);
    }
    const good = cipher.encrypt(key, 5, Buffer.alloc(0), Buffer.from('x'));
    for (const counter of [-1, 1.5, 2 ** 53, Number.NaN, Infinity]) {
      assert.is(cipher.decrypt(key, counter, Buffer.alloc(0), good), null, `counter ${counter}`);
    }
    for (const badKey of [Buffer.alloc(0), Buffer.alloc(16), Buffer.alloc(33)]) {
      assert.is(cipher.decrypt(badKey, 5, Buffer.alloc(0), good), null, `key of ${badKey.length} bytes`);
    }
  });

  s('out: sealing and opening in place give the same bytes as fresh buffers', () => {
    for (const size of [0, 1, 1400, 16 * 1024, 65535 - 16]) {
      const ad = size % 2 === 0 ? Buffer.alloc(0) : randomBytes(8);
      const pt = randomBytes(size);
      const expected = cipher.encrypt(key, 9, ad, pt);
      const memory = Buffer.alloc(size + TAG + 8, 0xee);
      const region = memory.subarray(4, 4 + size + TAG);
      pt.copy(region);
      const sealed = cipher.encrypt(key, 9, ad, region.subarray(0, size), region);
      assert.ok(sealed.equals(expected), `size ${size}: in-place ciphertext`);
      if (sealed !== region) sealed.copy(region); // a cipher may return a fresh buffer: callers use what it returns
      assert.is(memory.readUInt32BE(0), 0xeeeeeeee, 'nothing written before out');
      assert.is(memory.readUInt32BE(memory.length - 4), 0xeeeeeeee, 'nothing written after out');
      const opened = cipher.decrypt(key, 9, ad, region, region.subarray(0, size));
      assert.ok(opened !== null && opened.equals(pt), `size ${size}: in-place plaintext`);
    }
  });

  s('out: a tampered record opened in place is refused', () => {
    const pt = randomBytes(1400);
    const ct = cipher.encrypt(key, 5, Buffer.alloc(0), pt);
    ct[700]! ^= 1;
    assert.is(cipher.decrypt(key, 5, Buffer.alloc(0), ct, ct.subarray(0, 1400)), null);
  });

  s('encrypt refuses a counter outside [0, 2^53)', () => {
    for (const counter of [-1, 0.5, 2 ** 53, Number.NaN]) {
      assert.throws(() => cipher.encrypt(key, counter, Buffer.alloc(0), Buffer.from('x')), RangeError, `counter ${counter}`);
    }
  });

  s('accepts Uint8Array views (not only Buffers) for ad and plaintext', () => {
    const backing = new Uint8Array(64).fill(9);
    const pt = backing.subarray(8, 40);
    const ad = new Uint8Array([1, 2, 3]);
    const ct = cipher.encrypt(key, 3, ad, pt);
    assert.ok(cipher.decrypt(key, 3, ad, new Uint8Array(ct))?.equals(Buffer.from(pt)));
  });

  s.run();
}

test.run();
