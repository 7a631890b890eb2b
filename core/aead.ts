/**
 * An AEAD from node:crypto shaped as a CipherPlugin: the part the cipher
 * plugins share. Synchronous (the data path never awaits a record); one nonce
 * buffer per instance, rewritten per call (createCipheriv copies it).
 *
 * node:crypto always returns fresh buffers, so a caller's `out` costs one
 * copy here; a `fast` AEAD (libsodium's ChaCha20-Poly1305,
 * core/sodium-aead.ts; OpenSSL's AES-256-GCM or ChaCha20-Poly1305 through
 * koffi, core/openssl-aead.ts; or two of them split by record size,
 * bySize), when given, takes every record instead, in place and without
 * allocating.
 */
import { createCipheriv, createDecipheriv, type CipherGCMTypes } from 'node:crypto';
import type { CipherPlugin } from './types.ts';

const KEY_LENGTH = 32;
const TAG_LENGTH = 16;
const TWO_POW_32 = 0x1_0000_0000;

/** The same AEAD through a cheaper call that works in place (see the file comment). */
export interface InPlaceAead {
  /**
   * Seals plaintext into `out` (length plaintext.length + 16), which may be
   * the very memory of plaintext followed by 16 free bytes (in place).
   */
  encryptInto(key: Buffer, counter: number, ad: Uint8Array, plaintext: Uint8Array, out: Buffer): void;
  /**
   * Opens ciphertext into `out` (length ciphertext.length - 16, may start at
   * ciphertext's first byte). False when authentication fails; `out` is then
   * zeroed, so a caller that may retry with another key must not decrypt in
   * place.
   */
  decryptInto(key: Buffer, counter: number, ad: Uint8Array, ciphertext: Uint8Array, out: Uint8Array): boolean;
}

/**
 * One AEAD from two implementations of it, by record size: records of
 * `threshold` bytes or more (plaintext or ciphertext) go to `large`, the
 * rest to `small`. Both must compute the same function, so which one took
 * a record never shows on the wire.
 */
export function bySize(small: InPlaceAead, large: InPlaceAead, threshold: number): InPlaceAead {
  return {
    encryptInto(key, counter, ad, plaintext, out) {
      (plaintext.length >= threshold ? large : small).encryptInto(key, counter, ad, plaintext, out);
    },
    decryptInto(key, counter, ad, ciphertext, out) {
      return (ciphertext.length >= threshold ? large : small).decryptInto(key, counter, ad, ciphertext, out);
    },
  };
}

export interface NodeAeadSpec {
  /** The plugin's name, e.g. 'aes-256-gcm'. */
  name: string;
  /** Noise's name for it: 'AESGCM' or 'ChaChaPoly'. */
  noiseName: string;
  /** node:crypto's algorithm. */
  algorithm: CipherGCMTypes | 'chacha20-poly1305';
  /** Noise puts the 64-bit counter after 4 zero bytes: big-endian for AESGCM, little-endian for ChaChaPoly. */
  counterByteOrder: 'BE' | 'LE';
  /** The same AEAD from a library with a cheaper call that works in place: used for every record when given. */
  fast?: InPlaceAead | null;
  /** Where another thread makes `fast` (CipherPlugin.thread); offered only when `fast` loaded here. */
  thread?: { module: string; export: string };
}

/**
 * Noise's 96-bit nonce for a counter: 4 zero bytes, then the 64-bit counter
 * in `order`. One buffer, rewritten by every set() (callers use it at once).
 */
export function noiseNonce(order: 'BE' | 'LE'): { nonce: Buffer; set(counter: number): void } {
  const nonce = Buffer.alloc(12);
  const set =
    order === 'BE'
      ? (counter: number): void => {
          nonce.writeUInt32BE(Math.floor(counter / TWO_POW_32), 4);
          nonce.writeUInt32BE(counter >>> 0, 8);
        }
      : (counter: number): void => {
          nonce.writeUInt32LE(counter >>> 0, 4);
          nonce.writeUInt32LE(Math.floor(counter / TWO_POW_32), 8);
        };
  return { nonce, set };
}

export function nodeAead(spec: NodeAeadSpec): CipherPlugin {
  const { nonce, set: setNonce } = noiseNonce(spec.counterByteOrder);
  const validCounter = (counter: number): boolean => Number.isSafeInteger(counter) && counter >= 0;
  const options = { authTagLength: TAG_LENGTH };
  const fast = spec.fast ?? null;

  return {
    name: spec.name,
    noiseName: spec.noiseName,
    ...(spec.thread !== undefined && fast !== null ? { thread: spec.thread } : {}),
    encrypt(key, counter, ad, plaintext, out) {
      if (!validCounter(counter)) throw new RangeError('counter must be an integer in [0, 2^53)');
      const sealed = out ?? Buffer.allocUnsafe(plaintext.length + TAG_LENGTH);
      if (fast !== null) {
        fast.encryptInto(key, counter, ad, plaintext, sealed);
        return sealed;
      }
      setNonce(counter);
      const c = createCipheriv(spec.algorithm as 'chacha20-poly1305', key, nonce, options);
      if (ad.length > 0) c.setAAD(ad, { plaintextLength: plaintext.length });
      const body = c.update(plaintext);
      c.final();
      body.copy(sealed, 0);
      c.getAuthTag().copy(sealed, body.length);
      return sealed;
    },
    decrypt(key, counter, ad, ciphertext, out) {
      if (ciphertext.length < TAG_LENGTH || key.length !== KEY_LENGTH || !validCounter(counter)) return null;
      const bodyLength = ciphertext.length - TAG_LENGTH;
      if (fast !== null) {
        const plaintext = out ?? Buffer.allocUnsafe(bodyLength);
        return fast.decryptInto(key, counter, ad, ciphertext, plaintext) ? plaintext : null;
      }
      try {
        setNonce(counter);
        const d = createDecipheriv(spec.algorithm as 'chacha20-poly1305', key, nonce, options);
        d.setAuthTag(ciphertext.subarray(bodyLength));
        if (ad.length > 0) d.setAAD(ad, { plaintextLength: bodyLength });
        const plaintext = d.update(ciphertext.subarray(0, bodyLength));
        d.final(); // throws when the tag does not match
        return plaintext;
      } catch {
        return null;
      }
    },
  };
}
