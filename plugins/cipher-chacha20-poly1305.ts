/**
 * ChaCha20-Poly1305 (RFC 8439) as Noise's "ChaChaPoly": the 96-bit nonce is
 * 4 zero bytes followed by the 64-bit counter, little-endian. libsodium
 * (sodium-native) seals and opens, in place; node:crypto where sodium-native
 * has no binary for the platform (core/sodium-aead.ts says why). Usually the
 * fastest choice on CPUs without AES instructions.
 */
import { nodeAead } from '../core/aead.ts';
import { loadSodiumChaCha } from '../core/sodium-aead.ts';
import { definePlugin } from '../core/define.ts';
import type { CipherPlugin } from '../core/types.ts';

export default definePlugin({
  kind: 'cipher',
  name: 'chacha20-poly1305',
  description: 'ChaCha20-Poly1305 AEAD (Noise "ChaChaPoly"), fast everywhere',
  options: {},
  create(): CipherPlugin {
    return nodeAead({ name: 'chacha20-poly1305', noiseName: 'ChaChaPoly', algorithm: 'chacha20-poly1305', counterByteOrder: 'LE', fast: loadSodiumChaCha() });
  },
});
