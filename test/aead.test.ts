/**
 * The chacha20-poly1305 plugin seals with libsodium when sodium-native loads
 * and with node:crypto when it does not: both paths must be interchangeable
 * on the wire, so a client on one talks to a server on the other.
 */
import { randomBytes } from 'node:crypto';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { nodeAead } from '../core/aead.ts';
import { loadSodiumChaCha } from '../core/sodium-aead.ts';

const spec = { name: 'chacha20-poly1305', noiseName: 'ChaChaPoly', algorithm: 'chacha20-poly1305', counterByteOrder: 'LE' } as const;
const fast = loadSodiumChaCha();
const viaSodium = nodeAead({ ...spec, fast });
const viaNode = nodeAead({ ...spec, fast: null });

test('sodium-native loads on this platform (x64 Linux has a prebuilt binary)', () => {
  assert.ok(fast !== null, 'loadSodiumChaCha() returned null: the plugin would fall back to node:crypto');
});

test('libsodium and node:crypto agree byte for byte, and each opens what the other sealed', () => {
  const key = randomBytes(32);
  for (const size of [0, 1, 63, 64, 65, 1400, 4096, 16 * 1024, 65535 - 16]) {
    for (const counter of [0, 1, 2 ** 32 + 7, Number.MAX_SAFE_INTEGER]) {
      const ad = size % 2 === 0 ? Buffer.alloc(0) : randomBytes(12);
      const pt = randomBytes(size);
      const a = viaSodium.encrypt(key, counter, ad, pt);
      const b = viaNode.encrypt(key, counter, ad, pt);
      assert.ok(a.equals(b), `size ${size} counter ${counter}: same ciphertext`);
      assert.ok(viaNode.decrypt(key, counter, ad, a)?.equals(pt), `node opens sodium's (size ${size})`);
      assert.ok(viaSodium.decrypt(key, counter, ad, b)?.equals(pt), `sodium opens node's (size ${size})`);
      const bad = Buffer.from(a);
      bad[bad.length - 1]! ^= 0x80;
      assert.is(viaSodium.decrypt(key, counter, ad, bad), null, 'sodium refuses a bad tag');
      assert.is(viaNode.decrypt(key, counter, ad, bad), null, 'node refuses a bad tag');
    }
  }
});

test.run();
