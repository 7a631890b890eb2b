/**
 * AES-256-GCM as Noise's "AESGCM": the 96-bit nonce is 4 zero bytes
 * followed by the 64-bit counter, big-endian. Node's OpenSSL seals and
 * opens in place through koffi; node:crypto where that cannot load
 * (core/openssl-aead.ts says why). The fastest choice on CPUs with AES
 * instructions (most x86-64 and ARMv8).
 */
import { nodeAead } from '../core/aead.ts';
import { loadOpenSslAesGcm } from '../core/openssl-aead.ts';
import { definePlugin } from '../core/define.ts';
import type { CipherPlugin } from '../core/types.ts';

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
      fast: loadOpenSslAesGcm(),
      thread: { module: new URL('../core/openssl-aead.ts', import.meta.url).href, export: 'loadOpenSslAesGcm' },
    });
  },
});
