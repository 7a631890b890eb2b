/**
 * core/blake2s.ts: BLAKE2s-256, HMAC-BLAKE2s and Noise's HKDF over it in
 * JavaScript, held against RFC 7693's own example and against node:crypto
 * (OpenSSL) byte for byte, at every length and split around the 64-byte
 * block edges, where an incremental hash goes wrong if it does. The Noise
 * vectors (noise-vectors.test.ts) check it once more inside whole handshakes.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { blake2s, hkdfBlake2s, hmacBlake2s } from '../core/blake2s.ts';

const nodeHash = (data: Uint8Array): string => createHash('blake2s256').update(data).digest('hex');
const nodeHmac = (key: Uint8Array, data: Uint8Array): string => createHmac('blake2s256', key).update(data).digest('hex');

test('RFC 7693 appendix B: BLAKE2s-256("abc")', () => {
  assert.is(blake2s(Buffer.from('abc')).toString('hex'), '508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982');
});

test('the empty message', () => {
  assert.is(blake2s(new Uint8Array(0)).toString('hex'), '69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9');
});

test('every length 0..260, split into two parts at every block edge: same as node:crypto', () => {
  for (let n = 0; n <= 260; n++) {
    const data = randomBytes(n);
    const want = nodeHash(data);
    for (const at of [0, 1, 31, 32, 63, 64, 65, 127, 128, 129, n]) {
      const cut = Math.min(at, n);
      assert.is(blake2s(data.subarray(0, cut), data.subarray(cut)).toString('hex'), want, `length ${n}, split at ${cut}`);
    }
  }
});

test('parts that are views into a larger buffer are read from their own offset', () => {
  const big = randomBytes(300);
  const a = big.subarray(17, 17 + 40);
  const b = new Uint8Array(big.buffer, big.byteOffset + 101, 90);
  assert.is(blake2s(a, b).toString('hex'), nodeHash(Buffer.concat([a, b])));
});

test('HMAC-BLAKE2s: keys of 0..100 bytes, messages of 0..200, same as node:crypto', () => {
  for (const keyLength of [0, 1, 16, 32, 63, 64, 65, 100]) {
    const key = randomBytes(keyLength);
    for (const n of [0, 1, 32, 33, 63, 64, 65, 96, 128, 200]) {
      const data = randomBytes(n);
      const want = nodeHmac(key, data);
      assert.is(hmacBlake2s(key, data).toString('hex'), want, `key ${keyLength}, message ${n}`);
      const cut = n >>> 1;
      assert.is(hmacBlake2s(key, data.subarray(0, cut), data.subarray(cut)).toString('hex'), want, `key ${keyLength}, message ${n} in two parts`);
    }
  }
});

/** Noise's HKDF (section 4.3) written out with node:crypto's HMAC. */
function nodeHkdf(chainingKey: Uint8Array, ikm: Uint8Array, outputs: 2 | 3): string {
  const hmac = (key: Uint8Array, data: Uint8Array): Buffer => createHmac('blake2s256', key).update(data).digest();
  const temp = hmac(chainingKey, ikm);
  const out1 = hmac(temp, Uint8Array.of(1));
  const out2 = hmac(temp, Buffer.concat([out1, Uint8Array.of(2)]));
  const out = outputs === 2 ? [out1, out2] : [out1, out2, hmac(temp, Buffer.concat([out2, Uint8Array.of(3)]))];
  return Buffer.concat(out).toString('hex');
}

test('HKDF: 2 and 3 outputs, input key material of 0..100 bytes, same as HMACs from node:crypto', () => {
  for (const ikmLength of [0, 1, 32, 64, 65, 100]) {
    const chainingKey = randomBytes(32);
    const ikm = randomBytes(ikmLength);
    for (const outputs of [2, 3] as const) {
      const got = hkdfBlake2s(chainingKey, ikm, outputs);
      assert.is(got.length, outputs * 32);
      assert.is(got.toString('hex'), nodeHkdf(chainingKey, ikm, outputs), `ikm ${ikmLength}, ${outputs} outputs`);
    }
  }
});

test('HKDF and HMAC leave nothing behind that changes the next answer (the scratch they share)', () => {
  const ck = randomBytes(32);
  const ikm = randomBytes(32);
  const first = hkdfBlake2s(ck, ikm, 3).toString('hex');
  hmacBlake2s(randomBytes(100), randomBytes(150));
  hkdfBlake2s(randomBytes(32), new Uint8Array(0), 2);
  assert.is(hkdfBlake2s(ck, ikm, 3).toString('hex'), first);
});

test('results are fresh buffers: a later call does not overwrite an earlier result', () => {
  const a = blake2s(Buffer.from('first'));
  const copy = Buffer.from(a);
  blake2s(Buffer.from('second'));
  assert.ok(a.equals(copy));
  const k = hkdfBlake2s(randomBytes(32), randomBytes(32), 2);
  const kCopy = Buffer.from(k);
  hkdfBlake2s(randomBytes(32), randomBytes(32), 3);
  hmacBlake2s(randomBytes(32), randomBytes(32));
  assert.ok(k.equals(kCopy));
});

test.run();
