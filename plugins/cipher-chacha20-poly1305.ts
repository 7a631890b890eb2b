/**
 * ChaCha20-Poly1305 (RFC 8439) as Noise's "ChaChaPoly": the 96-bit nonce is
 * 4 zero bytes followed by the 64-bit counter, little-endian. Sealed and
 * opened in place: records under 4 KiB (TUN packets, small stream writes)
 * by libsodium, whose one call is the cheapest there: the system's
 * libsodium through koffi where one is installed (core/libsodium-aead.ts
 * says why it is cheaper), else the one inside sodium-native; larger
 * records by Node's OpenSSL through koffi, about twice as fast per byte
 * (core/openssl-aead.ts). Either alone where the other cannot load;
 * node:crypto where neither can (core/sodium-aead.ts says why). Usually the
 * fastest choice on CPUs without AES instructions.
 */
import { bySize, nodeAead, type InPlaceAead } from '../core/aead.ts';
import { loadLibsodiumChaCha } from '../core/libsodium-aead.ts';
import { loadOpenSslChaCha } from '../core/openssl-aead.ts';
import { loadSodiumChaCha } from '../core/sodium-aead.ts';
import { definePlugin } from '../core/define.ts';
import type { CipherPlugin } from '../core/types.ts';

/** Records from this size up go to OpenSSL (measured crossover ~3.4 KiB). */
const LARGE_RECORD = 4096;

/** The in-place AEAD this plugin uses; exported so a data-path thread makes the same (CipherPlugin.thread). */
export function fastChaCha(): InPlaceAead | null {
  const sodium = loadLibsodiumChaCha() ?? loadSodiumChaCha();
  const openssl = loadOpenSslChaCha();
  if (sodium !== null && openssl !== null) return bySize(sodium, openssl, LARGE_RECORD);
  return sodium ?? openssl;
}

export default definePlugin({
  kind: 'cipher',
  name: 'chacha20-poly1305',
  description: 'ChaCha20-Poly1305 AEAD (Noise "ChaChaPoly"), fast everywhere',
  options: {},
  create(): CipherPlugin {
    return nodeAead({
      name: 'chacha20-poly1305',
      noiseName: 'ChaChaPoly',
      algorithm: 'chacha20-poly1305',
      counterByteOrder: 'LE',
      fast: fastChaCha(),
      thread: { module: import.meta.url, export: 'fastChaCha' },
    });
  },
});
