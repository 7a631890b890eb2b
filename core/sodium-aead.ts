/**
 * ChaCha20-Poly1305 (RFC 8439, Noise "ChaChaPoly") from libsodium through
 * sodium-native: one cheap call per record, in place.
 *
 * Why: node:crypto builds a cipher context per record (createCipheriv,
 * setAAD, update, final, getAuthTag: about 10 µs for a 1400-byte packet) and
 * always returns fresh buffers, while one libsodium call seals the same packet
 * in about 2 µs, in place, with no allocation. Through node:crypto,
 * OpenSSL's faster ChaCha20 did not pay for its fresh output buffers on
 * large records (a 1 GiB SOCKS5 download took ~30 % more server CPU than
 * libsodium in place); called in place through koffi it does, so the
 * chacha20-poly1305 plugin gives it records of 4 KiB and more
 * (core/openssl-aead.ts) and keeps libsodium for the rest.
 *
 * sodium-native ships prebuilt binaries (no install script). Where none fits
 * the platform, `loadSodiumChaCha()` returns null and the plugin uses
 * node:crypto alone.
 */
import { noiseNonce, withAt, type InPlaceAead } from './aead.ts';
import { sodiumNative } from './sodium.ts';

const TAG_LENGTH = 16;
/** The part of sodium-native used here. */
interface SodiumAead {
  crypto_aead_chacha20poly1305_ietf_encrypt(c: Uint8Array, m: Uint8Array, ad: Uint8Array | null, nsec: null, npub: Uint8Array, k: Uint8Array): number;
  crypto_aead_chacha20poly1305_ietf_decrypt(m: Uint8Array, nsec: null, c: Uint8Array, ad: Uint8Array | null, npub: Uint8Array, k: Uint8Array): number;
}

/** libsodium's ChaCha20-Poly1305, or null when sodium-native cannot load here. */
export function loadSodiumChaCha(): InPlaceAead | null {
  const s = sodiumNative<SodiumAead>();
  if (s === null) return null;
  const { nonce, set: setNonce } = noiseNonce('LE');
  return withAt({
    encryptInto(key, counter, ad, plaintext, out) {
      setNonce(counter);
      s.crypto_aead_chacha20poly1305_ietf_encrypt(out.subarray(0, plaintext.length + TAG_LENGTH), plaintext, ad.length > 0 ? ad : null, null, nonce, key);
    },
    decryptInto(key, counter, ad, ciphertext, out) {
      setNonce(counter);
      try {
        s.crypto_aead_chacha20poly1305_ietf_decrypt(out, null, ciphertext, ad.length > 0 ? ad : null, nonce, key);
        return true;
      } catch {
        return false;
      }
    },
  });
}
