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
  /**
   * Seals buf[at, at + length) in place, its tag in the 16 bytes after it:
   * the same record as encryptInto. For a caller that seals in one place
   * again and again (a packet thread), which then hands over no views.
   * Throws a RangeError when buf has no room for the tag.
   */
  sealAt(key: Buffer, counter: number, ad: Uint8Array, buf: Uint8Array, at: number, length: number): void;
  /**
   * Opens the record buf[at, at + length) (its tag the last 16 bytes) in
   * place: the plaintext is then buf[at, at + length - 16). False when it is
   * not authentic or does not fit in buf; the plaintext's bytes are then
   * zeroed, as decryptInto's `out`.
   */
  openAt(key: Buffer, counter: number, ad: Uint8Array, buf: Uint8Array, at: number, length: number): boolean;
}

/** An InPlaceAead that may lack sealAt and openAt (a plugin's thread module from before them: the README asks only for the other two). */
export type InPlaceAeadBase = Pick<InPlaceAead, 'encryptInto' | 'decryptInto'> & Partial<Pick<InPlaceAead, 'sealAt' | 'openAt'>>;

/**
 * `aead` with sealAt and openAt: its own if it has them, else made of
 * encryptInto and decryptInto at one view each (for an AEAD with no cheaper
 * way to them: its library is handed views anyway).
 */
export function withAt(aead: InPlaceAeadBase): InPlaceAead {
  if (aead.sealAt !== undefined && aead.openAt !== undefined) return aead as InPlaceAead;
  return {
    encryptInto: (key, counter, ad, plaintext, out) => aead.encryptInto(key, counter, ad, plaintext, out),
    decryptInto: (key, counter, ad, ciphertext, out) => aead.decryptInto(key, counter, ad, ciphertext, out),
    sealAt(key, counter, ad, buf, at, length) {
      if (!fits(buf, at, length + TAG_LENGTH)) throw new RangeError('the record and its tag do not fit in the buffer');
      const record = Buffer.from(buf.buffer, buf.byteOffset + at, length + TAG_LENGTH);
      aead.encryptInto(key, counter, ad, record.subarray(0, length), record);
    },
    openAt(key, counter, ad, buf, at, length) {
      if (length < TAG_LENGTH || !fits(buf, at, length)) return false;
      const record = buf.subarray(at, at + length);
      return aead.decryptInto(key, counter, ad, record, record.subarray(0, length - TAG_LENGTH));
    },
  };
}

/** Whether buf[at, at + length) is inside buf, with whole numbers. */
export function fits(buf: Uint8Array, at: number, length: number): boolean {
  return Number.isInteger(at) && Number.isInteger(length) && at >= 0 && length >= 0 && at + length <= buf.length;
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
    sealAt(key, counter, ad, buf, at, length) {
      (length >= threshold ? large : small).sealAt(key, counter, ad, buf, at, length);
    },
    openAt(key, counter, ad, buf, at, length) {
      return (length >= threshold ? large : small).openAt(key, counter, ad, buf, at, length);
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
  // A DataView, not Buffer's write methods: it is set for every record (see bytes.ts).
  const view = new DataView(nonce.buffer, nonce.byteOffset, nonce.length);
  const set =
    order === 'BE'
      ? (counter: number): void => {
          view.setUint32(4, Math.floor(counter / TWO_POW_32));
          view.setUint32(8, counter >>> 0);
        }
      : (counter: number): void => {
          view.setUint32(4, counter >>> 0, true);
          view.setUint32(8, Math.floor(counter / TWO_POW_32), true);
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
