/**
 * ChaCha20-Poly1305 (RFC 8439) from node:crypto, as Noise's "ChaChaPoly":
 * the 96-bit nonce is 4 zero bytes followed by the 64-bit counter, little-endian.
 * Usually the fastest choice on CPUs without AES instructions.
 */
import { createCipheriv, createDecipheriv } from 'node:crypto';
import { definePlugin } from '../core/define.ts';
import type { CipherPlugin } from '../core/types.ts';

const KEY_LENGTH = 32;
const TAG_LENGTH = 16;
const TWO_POW_32 = 0x1_0000_0000;

export default definePlugin({
  kind: 'cipher',
  name: 'chacha20-poly1305',
  description: 'ChaCha20-Poly1305 AEAD (Noise "ChaChaPoly"), fast everywhere',
  options: {},
  create(): CipherPlugin {
    // One nonce buffer per instance, rewritten per call: createCipheriv copies it.
    const nonce = Buffer.alloc(12);
    const setNonce = (counter: number): void => {
      nonce.writeUInt32LE(counter >>> 0, 4);
      nonce.writeUInt32LE(Math.floor(counter / TWO_POW_32), 8);
    };
    const validCounter = (counter: number): boolean =>
      Number.isSafeInteger(counter) && counter >= 0;

    return {
      name: 'chacha20-poly1305',
      noiseName: 'ChaChaPoly',
      encrypt(key, counter, ad, plaintext) {
        if (!validCounter(counter)) throw new RangeError('counter must be an integer in [0, 2^53)');
        setNonce(counter);
        const c = createCipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_LENGTH });
        if (ad.length > 0) c.setAAD(ad, { plaintextLength: plaintext.length });
        const body = c.update(plaintext);
        c.final();
        const out = Buffer.allocUnsafe(body.length + TAG_LENGTH);
        body.copy(out, 0);
        c.getAuthTag().copy(out, body.length);
        return out;
      },
      decrypt(key, counter, ad, ciphertext) {
        if (ciphertext.length < TAG_LENGTH || key.length !== KEY_LENGTH || !validCounter(counter)) return null;
        try {
          setNonce(counter);
          const bodyLength = ciphertext.length - TAG_LENGTH;
          const d = createDecipheriv('chacha20-poly1305', key, nonce, { authTagLength: TAG_LENGTH });
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
  },
});
