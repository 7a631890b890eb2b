/**
 * AES-256-GCM as Noise's "AESGCM": the 96-bit nonce is 4 zero bytes
 * followed by the 64-bit counter, big-endian. Sealed and opened in place:
 * records under 4 KiB (TUN packets, small stream writes) by the system's
 * libsodium through koffi where one is installed and the CPU has AES-NI,
 * whose one call is the cheapest there (core/libsodium-aead.ts); larger
 * ones, and all of them where that cannot load, by Node's OpenSSL through
 * koffi, faster per byte (core/openssl-aead.ts); node:crypto where neither
 * can. The fastest choice on CPUs with AES instructions (most x86-64 and
 * ARMv8).
 */
import { bySize, nodeAead, type InPlaceAead } from '../core/aead.ts';
import { loadLibsodiumAesGcm } from '../core/libsodium-aead.ts';
import { loadOpenSslAesGcm } from '../core/openssl-aead.ts';
import { definePlugin } from '../core/define.ts';
import type { CipherPlugin } from '../core/types.ts';

/** Records from this size up go to OpenSSL (measured crossover ~5 KiB). */
const LARGE_RECORD = 4096;

/** The in-place AEAD this plugin uses; exported so a data-path thread makes the same (CipherPlugin.thread). */
export function fastAesGcm(): InPlaceAead | null {
  const small = loadLibsodiumAesGcm();
  const openssl = loadOpenSslAesGcm();
  if (small !== null && openssl !== null) return bySize(small, openssl, LARGE_RECORD);
  return openssl ?? small;
}

export default definePlugin({
  kind: 'cipher',
  name: 'aes-256-gcm',
  description: 'AES-256-GCM AEAD (Noise "AESGCM"), fastest with AES hardware',
  options: {},
  create(): CipherPlugin {
    return nodeAead({
      name: 'aes-256-gcm',
      noiseName: 'AESGCM',
      algorithm: 'aes-256-gcm',
      counterByteOrder: 'BE',
      fast: fastAesGcm(),
      thread: { module: import.meta.url, export: 'fastAesGcm' },
    });
  },
});
