/**
 * core/blake2s.ts: BLAKE2s-256 and HMAC-BLAKE2s in JavaScript, held against
 * RFC 7693's own example and against node:crypto (OpenSSL) byte for byte,
 * at every length and split around the 64-byte block edges, where an
 * incremental hash goes wrong if it does. The Noise vectors
 * (noise-vectors.test.ts) check it once more inside whole handshakes.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { blake2s, HmacBlake2s } from '../core/blake2s.ts';

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
    const mac = new HmacBlake2s(key);
    for (const n of [0, 1, 32, 33, 63, 64, 65, 96, 128, 200]) {
      const data = randomBytes(n);
      const want = nodeHmac(key, data);
      assert.is(mac.mac(data).toString('hex'), want, `key ${keyLength}, message ${n}`);
      const cut = n >>> 1;
      assert.is(mac.mac(data.subarray(0, cut), data.subarray(cut)).toString('hex'), want, `key ${keyLength}, message ${n} in two parts`);
    }
  }
});

test('one HmacBlake2s gives the same answer every time (its precomputed states are not used up)', () => {
  const key = randomBytes(32);
  const mac = new HmacBlake2s(key);
  const first = mac.mac(Uint8Array.of(1)).toString('hex');
  mac.mac(randomBytes(150));
  mac.mac(new Uint8Array(0));
  assert.is(mac.mac(Uint8Array.of(1)).toString('hex'), first);
  assert.is(first, nodeHmac(key, Uint8Array.of(1)));
});

test('results are fresh buffers: a later call does not overwrite an earlier result', () => {
  const a = blake2s(Buffer.from('first'));
  const copy = Buffer.from(a);
  blake2s(Buffer.from('second'));
  assert.ok(a.equals(copy));
});

test.run();
