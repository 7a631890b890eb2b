/**
 * ChaCha20-Poly1305 and AES-256-GCM from the system's libsodium (a shared
 * library: Debian's and Ubuntu's libsodium23, Fedora's libsodium), called
 * through koffi: one call per record, in place.
 *
 * Why: on a CPU back from idle, which is where a lone packet (a ping, a
 * SYN) finds it, the crossing from JavaScript into native code costs more
 * than the cipher, and koffi's crossing is the cheaper one. Sealing a
 * ping's 84 bytes as the first call after 10 ms idle took 18-26 µs through
 * koffi against 32-48 µs through sodium-native's N-API binding (the same
 * libsodium code; 9-15 µs from C), and AES-256-GCM 8-22 µs against 25-75
 * µs for OpenSSL's five EVP calls through koffi (bench/cold-calls.ts).
 * Warm, too, it is the cheapest for records of a few KiB: 0.75 against
 * 1.09 µs at 84 bytes, 1.3 against 2.1 µs for AES-256-GCM at 1400.
 * For large records OpenSSL is faster per byte, so the plugins split by
 * size (core/aead.ts bySize).
 *
 * Optional: sodium-native links its own libsodium and exports none of it,
 * so this needs libsodium installed on the system. Where none loads, or
 * its AES-256-GCM needs AES-NI and CLMUL that the CPU lacks, the loaders
 * return null and the plugins use the other paths. Before a loader returns
 * an AEAD it checks that the library seals a record byte for byte as
 * node:crypto does, opens it in place and refuses it altered, so a build
 * that behaves otherwise never reaches the wire.
 *
 * Lengths are checked here, not by the library: koffi hands it the
 * buffers' memory and libsodium writes what the lengths say.
 */
import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { fits, nodeAead, noiseNonce, type InPlaceAead, type NodeAeadSpec } from './aead.ts';
import { ViewOf } from './view-of.ts';

type Koffi = typeof import('koffi');

const TAG_LENGTH = 16;
/** The names the library goes by: the soname of libsodium 1.0.18 (Debian 12, Ubuntu), of 1.0.19 and later, and macOS's. */
const LIBRARY_NAMES = ['libsodium.so.23', 'libsodium.so.26', 'libsodium.so', 'libsodium.26.dylib', 'libsodium.23.dylib', 'libsodium.dylib'];

/** crypto_aead_*_encrypt(c, clen_p, m, mlen, ad, adlen, nsec, npub, k): 0 on success. */
type Seal = (c: Uint8Array, clen: null, m: Uint8Array, mlen: number, ad: Uint8Array | null, adlen: number, nsec: null, npub: Uint8Array, k: Uint8Array) => number;
/** crypto_aead_*_decrypt(m, mlen_p, nsec, c, clen, ad, adlen, npub, k): 0 when the record is authentic. */
type Open = (m: Uint8Array, mlen: null, nsec: null, c: Uint8Array, clen: number, ad: Uint8Array | null, adlen: number, npub: Uint8Array, k: Uint8Array) => number;

interface Sodium {
  chacha: { seal: Seal; open: Open };
  /** Null when this CPU lacks what libsodium's AES-256-GCM needs. */
  aesGcm: { seal: Seal; open: Open } | null;
}

/** The bindings, made once per thread; null when koffi or the library cannot load. */
let binding: Sodium | null | undefined;

function sodium(): Sodium | null {
  if (binding !== undefined) return binding;
  binding = null;
  let koffi: Koffi;
  try {
    koffi = createRequire(import.meta.url)('koffi') as Koffi;
  } catch {
    return null;
  }
  for (const name of LIBRARY_NAMES) {
    try {
      const lib = koffi.load(name);
      if ((lib.func('int sodium_init()')() as number) < 0) continue;
      const pair = (prefix: string): { seal: Seal; open: Open } => ({
        seal: lib.func(`int ${prefix}_encrypt(uint8_t *c, void *clen, const uint8_t *m, unsigned long long mlen, const uint8_t *ad, unsigned long long adlen, void *nsec, const uint8_t *npub, const uint8_t *k)`) as Seal,
        open: lib.func(`int ${prefix}_decrypt(uint8_t *m, void *mlen, void *nsec, const uint8_t *c, unsigned long long clen, const uint8_t *ad, unsigned long long adlen, const uint8_t *npub, const uint8_t *k)`) as Open,
      });
      const aesAvailable = (lib.func('int crypto_aead_aes256gcm_is_available()')() as number) === 1;
      binding = { chacha: pair('crypto_aead_chacha20poly1305_ietf'), aesGcm: aesAvailable ? pair('crypto_aead_aes256gcm') : null };
      return binding;
    } catch {
      // Not under this name, or without these symbols: try the next.
    }
  }
  return null;
}

/** libsodium's ChaCha20-Poly1305 through koffi, or null when no system libsodium loads here. */
export function loadLibsodiumChaCha(): InPlaceAead | null {
  const s = sodium();
  return s === null ? null : checked(inPlace(s.chacha.seal, s.chacha.open, 'LE'), { name: 'chacha20-poly1305', noiseName: 'ChaChaPoly', algorithm: 'chacha20-poly1305', counterByteOrder: 'LE' });
}

/** libsodium's AES-256-GCM through koffi, or null when no system libsodium loads or the CPU lacks AES-NI and CLMUL. */
export function loadLibsodiumAesGcm(): InPlaceAead | null {
  const s = sodium();
  return s === null || s.aesGcm === null ? null : checked(inPlace(s.aesGcm.seal, s.aesGcm.open, 'BE'), { name: 'aes-256-gcm', noiseName: 'AESGCM', algorithm: 'aes-256-gcm', counterByteOrder: 'BE' });
}

function inPlace(seal: Seal, open: Open, order: 'BE' | 'LE'): InPlaceAead {
  const { nonce, set: setNonce } = noiseNonce(order);
  // The library takes a pointer and a length: sealAt and openAt hand it a view from `at`, kept while `at` stays.
  const sealView = new ViewOf();
  const openView = new ViewOf();
  return {
    encryptInto(key, counter, ad, plaintext, out) {
      if (key.length !== 32 || out.length < plaintext.length + TAG_LENGTH) throw new RangeError('a 32-byte key and room for the plaintext and its tag are needed');
      setNonce(counter);
      if (seal(out, null, plaintext, plaintext.length, ad.length > 0 ? ad : null, ad.length, null, nonce, key) !== 0) throw new Error('libsodium refused to seal the record');
    },
    decryptInto(key, counter, ad, ciphertext, out) {
      const n = ciphertext.length - TAG_LENGTH;
      if (key.length !== 32 || n < 0 || out.length < n) return false;
      setNonce(counter);
      if (open(out, null, null, ciphertext, ciphertext.length, ad.length > 0 ? ad : null, ad.length, nonce, key) === 0) return true;
      out.fill(0, 0, n); // libsodium wipes it too; this does not depend on that
      return false;
    },
    sealAt(key, counter, ad, buf, at, length) {
      if (key.length !== 32 || !fits(buf, at, length + TAG_LENGTH)) throw new RangeError('a 32-byte key and room for the plaintext and its tag are needed');
      setNonce(counter);
      const record = sealView.from(buf, at);
      if (seal(record, null, record, length, ad.length > 0 ? ad : null, ad.length, null, nonce, key) !== 0) throw new Error('libsodium refused to seal the record');
    },
    openAt(key, counter, ad, buf, at, length) {
      if (key.length !== 32 || length < TAG_LENGTH || !fits(buf, at, length)) return false;
      setNonce(counter);
      const record = openView.from(buf, at);
      if (open(record, null, null, record, length, ad.length > 0 ? ad : null, ad.length, nonce, key) === 0) return true;
      buf.fill(0, at, at + length - TAG_LENGTH);
      return false;
    },
  };
}

/** `aead` if it seals as node:crypto does (`spec` without a fast path), opens in place and refuses an altered record; else null. */
function checked(aead: InPlaceAead, spec: NodeAeadSpec): InPlaceAead | null {
  try {
    const key = randomBytes(32);
    const ad = randomBytes(13);
    const plaintext = randomBytes(100);
    const counter = 2 ** 32 + 5;
    const expected = nodeAead({ ...spec, fast: null }).encrypt(key, counter, ad, plaintext);
    const memory = Buffer.alloc(plaintext.length + TAG_LENGTH);
    plaintext.copy(memory);
    aead.encryptInto(key, counter, ad, memory.subarray(0, plaintext.length), memory);
    if (!memory.equals(expected)) return null;
    if (!aead.decryptInto(key, counter, ad, memory, memory.subarray(0, plaintext.length)) || !memory.subarray(0, plaintext.length).equals(plaintext)) return null;
    // sealAt and openAt, away from the buffer's start, as a packet thread calls them.
    const at = 7;
    const spaced = Buffer.alloc(at + expected.length + 3);
    plaintext.copy(spaced, at);
    aead.sealAt(key, counter, ad, spaced, at, plaintext.length);
    if (!spaced.subarray(at, at + expected.length).equals(expected)) return null;
    if (!aead.openAt(key, counter, ad, spaced, at, expected.length) || !spaced.subarray(at, at + plaintext.length).equals(plaintext)) return null;
    expected[0]! ^= 1;
    if (aead.decryptInto(key, counter, ad, expected, Buffer.alloc(plaintext.length))) return null;
    spaced.set(expected, at);
    if (aead.openAt(key, counter, ad, spaced, at, expected.length)) return null;
    return aead;
  } catch {
    return null;
  }
}
