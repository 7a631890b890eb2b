/**
 * BLAKE2s-256 (RFC 7693, unkeyed), HMAC-BLAKE2s (RFC 2104) and Noise's HKDF
 * over it, in JavaScript: the hash of dshield's default Noise suite, used by
 * the handshake (core/noise.ts), where every message runs a few HKDFs and
 * hashes over inputs of 32-100 bytes.
 *
 * Why not node:crypto: at those sizes its cost is the call, not the hash.
 * createHmac + update + digest takes ~3.3 µs and createHash ~2.3 µs (Intel
 * VM), while one 64-byte block of BLAKE2s costs ~0.2-0.6 µs in JavaScript.
 * An HKDF hashes the (key XOR pad) blocks of its temporary key once for all
 * its outputs, so each further output costs two blocks, and it works in
 * module scratch (wiped before it returns) with its result as its only
 * allocation: ~25 % less time per HKDF than one HMAC object per key.
 *
 * Constant time: only 32-bit additions, XORs and rotations; the message
 * schedule (SIGMA) depends on the round number, never on the data.
 * Not reentrant across threads (module scratch), and it need not be: every
 * call runs to completion synchronously.
 */

export const BLAKE2S_LENGTH = 32;
const BLOCK = 64;

const IV = Uint32Array.of(0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19);

/** The message word order of each of the 10 rounds. */
// prettier-ignore
const SIGMA = Uint8Array.of(
  0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
  14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3,
  11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4,
  7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8,
  9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13,
  2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9,
  12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11,
  13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10,
  6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5,
  10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0,
);

/** The message block as 16 little-endian words (scratch). */
const m = new Uint32Array(16);

/**
 * The compression function F: folds the 64 bytes at block[off] into h.
 * `t`: bytes hashed so far including this block (< 2^53); `last`: the final block.
 * The working vector lives in locals, and G is written out eight times per
 * round, because V8 keeps locals in registers but not a typed array's slots.
 */
function compress(h: Uint32Array, block: Uint8Array, off: number, t: number, last: boolean): void {
  for (let i = 0; i < 16; i++, off += 4) m[i] = block[off]! | (block[off + 1]! << 8) | (block[off + 2]! << 16) | (block[off + 3]! << 24);
  let v0 = h[0]! | 0, v1 = h[1]! | 0, v2 = h[2]! | 0, v3 = h[3]! | 0;
  let v4 = h[4]! | 0, v5 = h[5]! | 0, v6 = h[6]! | 0, v7 = h[7]! | 0;
  let v8 = IV[0]! | 0, v9 = IV[1]! | 0, v10 = IV[2]! | 0, v11 = IV[3]! | 0;
  let v12 = (IV[4]! ^ t) | 0, v13 = (IV[5]! ^ (t / 0x1_0000_0000)) | 0, v14 = IV[6]! | 0, v15 = IV[7]! | 0;
  if (last) v14 = ~v14;
  for (let s = 0; s < 160; s += 16) {
    // G(v0, v4, v8, v12) ... G(v3, v4, v9, v14): columns, then diagonals.
    v0 = (v0 + v4 + m[SIGMA[s]!]!) | 0; v12 ^= v0; v12 = (v12 >>> 16) | (v12 << 16);
    v8 = (v8 + v12) | 0; v4 ^= v8; v4 = (v4 >>> 12) | (v4 << 20);
    v0 = (v0 + v4 + m[SIGMA[s + 1]!]!) | 0; v12 ^= v0; v12 = (v12 >>> 8) | (v12 << 24);
    v8 = (v8 + v12) | 0; v4 ^= v8; v4 = (v4 >>> 7) | (v4 << 25);

    v1 = (v1 + v5 + m[SIGMA[s + 2]!]!) | 0; v13 ^= v1; v13 = (v13 >>> 16) | (v13 << 16);
    v9 = (v9 + v13) | 0; v5 ^= v9; v5 = (v5 >>> 12) | (v5 << 20);
    v1 = (v1 + v5 + m[SIGMA[s + 3]!]!) | 0; v13 ^= v1; v13 = (v13 >>> 8) | (v13 << 24);
    v9 = (v9 + v13) | 0; v5 ^= v9; v5 = (v5 >>> 7) | (v5 << 25);

    v2 = (v2 + v6 + m[SIGMA[s + 4]!]!) | 0; v14 ^= v2; v14 = (v14 >>> 16) | (v14 << 16);
    v10 = (v10 + v14) | 0; v6 ^= v10; v6 = (v6 >>> 12) | (v6 << 20);
    v2 = (v2 + v6 + m[SIGMA[s + 5]!]!) | 0; v14 ^= v2; v14 = (v14 >>> 8) | (v14 << 24);
    v10 = (v10 + v14) | 0; v6 ^= v10; v6 = (v6 >>> 7) | (v6 << 25);

    v3 = (v3 + v7 + m[SIGMA[s + 6]!]!) | 0; v15 ^= v3; v15 = (v15 >>> 16) | (v15 << 16);
    v11 = (v11 + v15) | 0; v7 ^= v11; v7 = (v7 >>> 12) | (v7 << 20);
    v3 = (v3 + v7 + m[SIGMA[s + 7]!]!) | 0; v15 ^= v3; v15 = (v15 >>> 8) | (v15 << 24);
    v11 = (v11 + v15) | 0; v7 ^= v11; v7 = (v7 >>> 7) | (v7 << 25);

    v0 = (v0 + v5 + m[SIGMA[s + 8]!]!) | 0; v15 ^= v0; v15 = (v15 >>> 16) | (v15 << 16);
    v10 = (v10 + v15) | 0; v5 ^= v10; v5 = (v5 >>> 12) | (v5 << 20);
    v0 = (v0 + v5 + m[SIGMA[s + 9]!]!) | 0; v15 ^= v0; v15 = (v15 >>> 8) | (v15 << 24);
    v10 = (v10 + v15) | 0; v5 ^= v10; v5 = (v5 >>> 7) | (v5 << 25);

    v1 = (v1 + v6 + m[SIGMA[s + 10]!]!) | 0; v12 ^= v1; v12 = (v12 >>> 16) | (v12 << 16);
    v11 = (v11 + v12) | 0; v6 ^= v11; v6 = (v6 >>> 12) | (v6 << 20);
    v1 = (v1 + v6 + m[SIGMA[s + 11]!]!) | 0; v12 ^= v1; v12 = (v12 >>> 8) | (v12 << 24);
    v11 = (v11 + v12) | 0; v6 ^= v11; v6 = (v6 >>> 7) | (v6 << 25);

    v2 = (v2 + v7 + m[SIGMA[s + 12]!]!) | 0; v13 ^= v2; v13 = (v13 >>> 16) | (v13 << 16);
    v8 = (v8 + v13) | 0; v7 ^= v8; v7 = (v7 >>> 12) | (v7 << 20);
    v2 = (v2 + v7 + m[SIGMA[s + 13]!]!) | 0; v13 ^= v2; v13 = (v13 >>> 8) | (v13 << 24);
    v8 = (v8 + v13) | 0; v7 ^= v8; v7 = (v7 >>> 7) | (v7 << 25);

    v3 = (v3 + v4 + m[SIGMA[s + 14]!]!) | 0; v14 ^= v3; v14 = (v14 >>> 16) | (v14 << 16);
    v9 = (v9 + v14) | 0; v4 ^= v9; v4 = (v4 >>> 12) | (v4 << 20);
    v3 = (v3 + v4 + m[SIGMA[s + 15]!]!) | 0; v14 ^= v3; v14 = (v14 >>> 8) | (v14 << 24);
    v9 = (v9 + v14) | 0; v4 ^= v9; v4 = (v4 >>> 7) | (v4 << 25);
  }
  h[0] ^= v0 ^ v8;
  h[1] ^= v1 ^ v9;
  h[2] ^= v2 ^ v10;
  h[3] ^= v3 ^ v11;
  h[4] ^= v4 ^ v12;
  h[5] ^= v5 ^ v13;
  h[6] ^= v6 ^ v14;
  h[7] ^= v7 ^ v15;
}

/** The chaining value a hash starts from: IV with the parameter block (depth 1, fanout 1, no key, 32-byte digest). */
const START = IV.slice();
START[0] ^= 0x01010000 | BLAKE2S_LENGTH;

// Scratch for runInto(): the chaining value and the block being filled.
const h = new Uint32Array(8);
const block = new Uint8Array(BLOCK);
const EMPTY = new Uint8Array(0);

/**
 * Finishes a hash that had reached the chaining value at from[at..at+8)
 * after `hashed` bytes (0, or whole blocks known not to be the last) by
 * hashing `a` then `b`, and writes the digest to out[o..o+32). With
 * hashed > 0 at least one more byte must follow (mac sees to it). Two parts
 * rather than a list: every caller has one or two, and an array per call
 * would cost more than the copying. `out` may be `a` or `b`: the parts are
 * read before the digest is written.
 */
function runInto(from: Uint32Array, at: number, hashed: number, a: Uint8Array, b: Uint8Array, out: Uint8Array, o: number): void {
  for (let i = 0; i < 8; i++) h[i] = from[at + i]!;
  let t = hashed;
  let fill = 0;
  for (let part = 0; part < 2; part++) {
    const data = part === 0 ? a : b;
    for (let off = 0; off < data.length; ) {
      // A full block is compressed only once more bytes are known to follow: the last one is flagged.
      if (fill === BLOCK) {
        t += BLOCK;
        compress(h, block, 0, t, false);
        fill = 0;
      }
      const take = Math.min(data.length - off, BLOCK - fill);
      if (take === data.length) block.set(data, fill); // the usual case: the whole part fits
      else for (let i = 0; i < take; i++) block[fill + i] = data[off + i]!;
      fill += take;
      off += take;
    }
  }
  t += fill;
  block.fill(0, fill);
  compress(h, block, 0, t, true);
  for (let i = 0; i < 8; i++, o += 4) {
    const word = h[i]!;
    out[o] = word;
    out[o + 1] = word >>> 8;
    out[o + 2] = word >>> 16;
    out[o + 3] = word >>> 24;
  }
}

/** BLAKE2s-256 of `a` followed by `b`. */
export function blake2s(a: Uint8Array, b: Uint8Array = EMPTY): Buffer {
  const out = Buffer.allocUnsafe(BLAKE2S_LENGTH);
  runInto(START, 0, 0, a, b, out, 0);
  return out;
}

// ---------------------------------------------------------------------------
// HMAC and Noise's HKDF

const IPAD = 0x36;
const OPAD = 0x5c;
/** Scratch: the key XOR a pad. */
const pad = new Uint8Array(BLOCK);
/** Scratch: the chaining values after the current key's ipad block [0, 8) and opad block [8, 16). */
const keyStates = new Uint32Array(16);
/** Scratch: the current key when it had to be hashed first (over 64 bytes), HKDF's temporary key, an inner digest. */
const hashedKey = new Uint8Array(BLAKE2S_LENGTH);
const tempKey = new Uint8Array(BLAKE2S_LENGTH);
const inner = new Uint8Array(BLAKE2S_LENGTH);
const ONE = Uint8Array.of(1);
const TWO = Uint8Array.of(2);
const THREE = Uint8Array.of(3);

/** Fills `pad` with key XOR `byte` (RFC 2104's ipad 0x36 or opad 0x5c). */
function padKey(key: Uint8Array, byte: number): void {
  pad.fill(byte);
  for (let i = 0; i < key.length; i++) pad[i] = key[i]! ^ byte;
}

/**
 * Fills keyStates for HMAC under `key`, and returns the key HMAC uses: `key`
 * itself, or its hash when it is longer than a block (RFC 2104).
 */
function primeKey(key: Uint8Array): Uint8Array {
  if (key.length > BLOCK) {
    runInto(START, 0, 0, key, EMPTY, hashedKey, 0);
    key = hashedKey;
  }
  padKey(key, IPAD);
  h.set(START);
  compress(h, pad, 0, BLOCK, false);
  keyStates.set(h, 0);
  padKey(key, OPAD);
  h.set(START);
  compress(h, pad, 0, BLOCK, false);
  keyStates.set(h, 8);
  return key;
}

/**
 * HMAC(key, `a` followed by `b`) into out[o..o+32), keyStates being primed
 * for `key` (as primeKey returned it). Each further message under the same
 * key costs two blocks: the pad blocks are not hashed again.
 */
function mac(key: Uint8Array, a: Uint8Array, b: Uint8Array, out: Uint8Array, o: number): void {
  if (a.length + b.length > 0) {
    runInto(keyStates, 0, BLOCK, a, b, inner, 0);
  } else {
    // The ipad block is then the last block, and must be hashed as such.
    padKey(key, IPAD);
    runInto(START, 0, 0, pad, EMPTY, inner, 0);
  }
  runInto(keyStates, 8, BLOCK, inner, EMPTY, out, o); // the inner digest always follows the opad block
}

/** The key material the scratch held (pads, states, the blocks last hashed), so none of it outlives the call. */
function wipe(): void {
  m.fill(0);
  h.fill(0);
  block.fill(0);
  pad.fill(0);
  keyStates.fill(0);
  hashedKey.fill(0);
  tempKey.fill(0);
  inner.fill(0);
}

/** HMAC-BLAKE2s(key, `a` followed by `b`), RFC 2104, for a key of any length. */
export function hmacBlake2s(key: Uint8Array, a: Uint8Array, b: Uint8Array = EMPTY): Buffer {
  const out = Buffer.allocUnsafe(BLAKE2S_LENGTH);
  mac(primeKey(key), a, b, out, 0);
  wipe();
  return out;
}

/**
 * Noise's HKDF(chainingKey, ikm) over HMAC-BLAKE2s: `outputs` × 32 bytes in
 * one new Buffer, output i at [32 i, 32 i + 32). Ten blocks for two outputs,
 * and no memory but the result: a server handshake runs eight of these.
 */
export function hkdfBlake2s(chainingKey: Uint8Array, ikm: Uint8Array, outputs: 2 | 3): Buffer {
  mac(primeKey(chainingKey), ikm, EMPTY, tempKey, 0);
  primeKey(tempKey);
  const out = Buffer.allocUnsafe(outputs * BLAKE2S_LENGTH);
  mac(tempKey, ONE, EMPTY, out, 0);
  mac(tempKey, out.subarray(0, BLAKE2S_LENGTH), TWO, out, BLAKE2S_LENGTH);
  if (outputs === 3) mac(tempKey, out.subarray(BLAKE2S_LENGTH, 2 * BLAKE2S_LENGTH), THREE, out, 2 * BLAKE2S_LENGTH);
  wipe();
  return out;
}
