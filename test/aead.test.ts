/**
 * Each cipher plugin seals through in-place fast paths when they load
 * (the system libsodium's ChaCha20-Poly1305 and AES-256-GCM through koffi,
 * sodium-native's ChaCha20-Poly1305, Node's OpenSSL ChaCha20-Poly1305 and
 * AES-256-GCM through koffi, and each plugin's split of them by record
 * size) and through node:crypto when they do not:
 * every path must be interchangeable on the wire, so a client on one talks
 * to a server on another.
 */
import { randomBytes } from 'node:crypto';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bySize, nodeAead, type InPlaceAead, type NodeAeadSpec } from '../core/aead.ts';
import { loadLibsodiumAesGcm, loadLibsodiumChaCha } from '../core/libsodium-aead.ts';
import { loadOpenSslAesGcm, loadOpenSslChaCha } from '../core/openssl-aead.ts';
import { loadSodiumChaCha } from '../core/sodium-aead.ts';
import { fastAesGcm } from '../plugins/cipher-aes-256-gcm.ts';
import { fastChaCha } from '../plugins/cipher-chacha20-poly1305.ts';

const CHACHA: NodeAeadSpec = { name: 'chacha20-poly1305', noiseName: 'ChaChaPoly', algorithm: 'chacha20-poly1305', counterByteOrder: 'LE' };
const AES_GCM: NodeAeadSpec = { name: 'aes-256-gcm', noiseName: 'AESGCM', algorithm: 'aes-256-gcm', counterByteOrder: 'BE' };
const sodiumChaCha = loadSodiumChaCha();
const opensslChaCha = loadOpenSslChaCha();
/** `checksLengths`: the path hands memory to C by address, so it must refuse an output too small itself. */
const CASES: { spec: NodeAeadSpec; fast: InPlaceAead | null; library: string; checksLengths?: boolean }[] = [
  { spec: CHACHA, fast: loadLibsodiumChaCha(), library: 'the system libsodium through koffi', checksLengths: true },
  { spec: CHACHA, fast: sodiumChaCha, library: 'sodium-native' },
  { spec: CHACHA, fast: opensslChaCha, library: 'OpenSSL through koffi' },
  {
    spec: CHACHA,
    fast: sodiumChaCha && opensslChaCha && bySize(sodiumChaCha, opensslChaCha, 4096),
    library: 'sodium-native under 4 KiB and OpenSSL above',
  },
  { spec: CHACHA, fast: fastChaCha(), library: 'the plugin\'s split (system libsodium under 4 KiB, OpenSSL above)' },
  { spec: AES_GCM, fast: loadLibsodiumAesGcm(), library: 'the system libsodium through koffi', checksLengths: true },
  { spec: AES_GCM, fast: loadOpenSslAesGcm(), library: 'OpenSSL through koffi' },
  { spec: AES_GCM, fast: fastAesGcm(), library: 'the plugin\'s split (system libsodium under 4 KiB, OpenSSL above)' },
];

for (const { spec, fast, library, checksLengths } of CASES) {
  const viaFast = nodeAead({ ...spec, fast });
  const viaNode = nodeAead({ ...spec, fast: null });

  test(`${spec.name}: the ${library} path loads on this platform`, () => {
    assert.ok(fast !== null, `the ${library} path returned null: the plugin would fall back to node:crypto`);
  });

  test(`${spec.name}: ${library} and node:crypto agree byte for byte, and each opens what the other sealed`, () => {
    const key = randomBytes(32);
    for (const size of [0, 1, 63, 64, 65, 1400, 4096, 16 * 1024, 65535 - 16]) {
      for (const counter of [0, 1, 2 ** 32 + 7, Number.MAX_SAFE_INTEGER]) {
        const ad = size % 2 === 0 ? Buffer.alloc(0) : randomBytes(12);
        const pt = randomBytes(size);
        const a = viaFast.encrypt(key, counter, ad, pt);
        const b = viaNode.encrypt(key, counter, ad, pt);
        assert.ok(a.equals(b), `size ${size} counter ${counter}: same ciphertext`);
        assert.ok(viaNode.decrypt(key, counter, ad, a)?.equals(pt), `node opens the fast path's (size ${size})`);
        assert.ok(viaFast.decrypt(key, counter, ad, b)?.equals(pt), `the fast path opens node's (size ${size})`);
        const bad = Buffer.from(a);
        bad[bad.length - 1]! ^= 0x80;
        assert.is(viaFast.decrypt(key, counter, ad, bad), null, 'the fast path refuses a bad tag');
        assert.is(viaNode.decrypt(key, counter, ad, bad), null, 'node refuses a bad tag');
        if (ad.length > 0) assert.is(viaFast.decrypt(key, counter, Buffer.alloc(12), a), null, 'the fast path refuses other associated data');
      }
    }
  });

  test(`${spec.name}: in place, both ways, and a refused record leaves no plaintext behind`, () => {
    const key = randomBytes(32);
    for (const size of [1400, 16 * 1024]) {
      const pt = randomBytes(size);
      const memory = Buffer.alloc(size + 16);
      pt.copy(memory);
      const sealed = viaFast.encrypt(key, 9, Buffer.alloc(0), memory.subarray(0, size), memory);
      assert.is(sealed.buffer, memory.buffer, `sealed over the plaintext (${size} bytes)`);
      assert.ok(sealed.equals(viaNode.encrypt(key, 9, Buffer.alloc(0), pt)));
      const opened = viaFast.decrypt(key, 9, Buffer.alloc(0), memory, memory.subarray(0, size));
      assert.ok(opened !== null && opened.equals(pt), `opened over the ciphertext (${size} bytes)`);

      const tampered = viaNode.encrypt(key, 10, Buffer.alloc(0), pt);
      tampered[0]! ^= 1;
      const out = Buffer.alloc(size, 0xaa);
      assert.is(viaFast.decrypt(key, 10, Buffer.alloc(0), tampered, out), null);
      assert.ok(out.every((b) => b === 0), `the output is wiped, not left with unauthenticated plaintext (${size} bytes)`);
    }
  });

  test(`${spec.name}: a key buffer rewritten in place is used with its new bytes, never a stale key`, () => {
    const key = randomBytes(32);
    const pt = randomBytes(100);
    // Enough uses that a fast path keeping per-key state (OpenSSL's contexts) has it.
    for (let counter = 2; counter < 12; counter++) viaFast.decrypt(key, counter, Buffer.alloc(0), viaFast.encrypt(key, counter, Buffer.alloc(0), pt));
    const before = viaFast.encrypt(key, 1, Buffer.alloc(0), pt);
    randomBytes(32).copy(key);
    const after = viaFast.encrypt(key, 1, Buffer.alloc(0), pt);
    assert.not.ok(after.equals(before));
    assert.ok(after.equals(viaNode.encrypt(key, 1, Buffer.alloc(0), pt)));
    assert.ok(viaFast.decrypt(key, 1, Buffer.alloc(0), after)?.equals(pt));
    assert.is(viaFast.decrypt(key, 1, Buffer.alloc(0), before), null, 'what the old key sealed no longer opens');
  });

  if (checksLengths) {
    test(`${spec.name}: ${library} refuses an output too small for the record, before the library writes`, () => {
      const key = randomBytes(32);
      const pt = randomBytes(100);
      const sealed = viaNode.encrypt(key, 3, Buffer.alloc(0), pt);
      const guard = Buffer.alloc(200, 0x55);
      assert.throws(() => fast!.encryptInto(key, 3, Buffer.alloc(0), pt, guard.subarray(0, 115)), RangeError);
      assert.ok(guard.every((b) => b === 0x55), 'nothing was written');
      assert.is(fast!.decryptInto(key, 3, Buffer.alloc(0), sealed, guard.subarray(0, 99)), false);
      assert.ok(guard.every((b) => b === 0x55), 'nothing was written');
      assert.is(fast!.decryptInto(key, 3, Buffer.alloc(0), sealed.subarray(0, 15), guard), false, 'shorter than a tag');
      assert.throws(() => fast!.encryptInto(key.subarray(0, 16), 3, Buffer.alloc(0), pt, Buffer.alloc(116)), RangeError, 'a short key');
    });
  }
}

test.run();
