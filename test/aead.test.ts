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
import { bySize, nodeAead, noiseNonce, withAt, type InPlaceAead, type NodeAeadSpec } from '../core/aead.ts';
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

  test(`${spec.name}: ${library} seals and opens in place at an offset (sealAt, openAt) as it does by views, and refuses what does not fit`, () => {
    const key = randomBytes(32);
    for (const size of [0, 1, 84, 1400, 16 * 1024]) {
      // The same buffer again and again, at a few offsets, as a packet thread does: a view kept from one call must not leak into the next.
      const memory = Buffer.alloc(32 + size + 16 + 5, 0xee);
      for (const at of [13, 13, 0, 29, 13]) {
        const ad = randomBytes(at % 2 === 0 ? 0 : 13);
        const pt = randomBytes(size);
        memory.fill(0xee);
        pt.copy(memory, at);
        fast!.sealAt(key, at + size, ad, memory, at, size);
        const sealed = memory.subarray(at, at + size + 16);
        assert.ok(sealed.equals(viaNode.encrypt(key, at + size, ad, pt)), `sealed as node:crypto seals (${size} bytes at ${at})`);
        assert.ok(memory.subarray(at + size + 16).every((b) => b === 0xee) && memory.subarray(0, at).every((b) => b === 0xee), 'nothing written outside the record');
        assert.ok(fast!.openAt(key, at + size, ad, memory, at, size + 16), `opened (${size} bytes at ${at})`);
        assert.ok(memory.subarray(at, at + size).equals(pt), 'the plaintext is back in place');
      }
      const pt = randomBytes(size);
      const tampered = viaNode.encrypt(key, 4, Buffer.alloc(0), pt);
      tampered[tampered.length - 1]! ^= 1;
      memory.fill(0xee);
      tampered.copy(memory, 13);
      assert.is(fast!.openAt(key, 4, Buffer.alloc(0), memory, 13, tampered.length), false, `a bad tag is refused (${size} bytes)`);
      assert.ok(memory.subarray(13, 13 + size).every((b) => b === 0), 'the refused plaintext is wiped');
    }
    const guard = Buffer.alloc(100, 0x55);
    assert.throws(() => fast!.sealAt(key, 1, Buffer.alloc(0), guard, 10, 80), RangeError, 'no room for the tag');
    assert.throws(() => fast!.sealAt(key, 1, Buffer.alloc(0), guard, -1, 10), RangeError, 'a negative offset');
    assert.throws(() => fast!.sealAt(key, 1, Buffer.alloc(0), guard, 1.5, 10), RangeError, 'a fractional offset');
    assert.ok(guard.every((b) => b === 0x55), 'nothing was written');
    assert.is(fast!.openAt(key, 1, Buffer.alloc(0), guard, 90, 20), false, 'a record past the end');
    assert.is(fast!.openAt(key, 1, Buffer.alloc(0), guard, 0, 15), false, 'shorter than a tag');
    assert.ok(guard.every((b) => b === 0x55), 'nothing was written');
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

test('withAt: an AEAD with only encryptInto and decryptInto (a plugin\'s thread module) gets sealAt and openAt that seal and open the same records', () => {
  const viaNode = nodeAead({ ...CHACHA, fast: null });
  const base = {
    encryptInto(key: Buffer, counter: number, ad: Uint8Array, plaintext: Uint8Array, out: Buffer): void {
      viaNode.encrypt(key, counter, ad, Buffer.from(plaintext)).copy(out);
    },
    decryptInto(key: Buffer, counter: number, ad: Uint8Array, ciphertext: Uint8Array, out: Uint8Array): boolean {
      const opened = viaNode.decrypt(key, counter, ad, Buffer.from(ciphertext));
      if (opened === null) return false;
      out.set(opened);
      return true;
    },
  };
  const aead = withAt(base);
  const key = randomBytes(32);
  const pt = randomBytes(84);
  const memory = Buffer.alloc(13 + 84 + 16);
  pt.copy(memory, 13);
  aead.sealAt(key, 5, Buffer.alloc(0), memory, 13, 84);
  assert.ok(memory.subarray(13).equals(viaNode.encrypt(key, 5, Buffer.alloc(0), pt)));
  assert.ok(aead.openAt(key, 5, Buffer.alloc(0), memory, 13, 100));
  assert.ok(memory.subarray(13, 13 + 84).equals(pt));
  assert.throws(() => aead.sealAt(key, 5, Buffer.alloc(0), memory, 13, 90), RangeError);
  assert.is(aead.openAt(key, 5, Buffer.alloc(0), memory, 13, 101), false);
  const full = loadLibsodiumChaCha();
  if (full !== null) assert.is(withAt(full), full, 'one that has them keeps its own');
});

test("noiseNonce: 4 zero bytes, then the 64-bit counter in the cipher's byte order (AESGCM big-endian, ChaChaPoly little-endian)", () => {
  const be = noiseNonce('BE');
  const le = noiseNonce('LE');
  for (const counter of [0, 1, 0xffff_ffff, 2 ** 32, 2 ** 32 + 7, 2 ** 40 + 0x1234_5678, Number.MAX_SAFE_INTEGER]) {
    const big = Buffer.alloc(12);
    big.writeBigUInt64BE(BigInt(counter), 4);
    const little = Buffer.alloc(12);
    little.writeBigUInt64LE(BigInt(counter), 4);
    be.set(counter);
    le.set(counter);
    assert.equal([...be.nonce], [...big], `big-endian nonce of ${counter}`);
    assert.equal([...le.nonce], [...little], `little-endian nonce of ${counter}`);
  }
});

test.run();
