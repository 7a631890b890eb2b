/**
 * AES-256-GCM and ChaCha20-Poly1305 from the OpenSSL that Node itself is
 * built with, called through koffi: one call sequence per record, in place,
 * with the key schedule kept per key.
 *
 * Why: node:crypto builds a cipher context per record (createCipheriv
 * expands the key and sets up GHASH every time) and always returns fresh
 * buffers. Measured here: a 1400-byte packet costs ~13.6 µs that way and
 * ~2.1-4.4 µs through EVP on a context keyed once; a 64 KiB record ~75 µs
 * (0.87 GB/s) against ~16-20 µs (3.3-4.1 GB/s). Same library, same
 * AES-NI code: the saving is the per-call set-up and the copies.
 * ChaCha20-Poly1305 (its AVX2/AVX-512 code) runs ~2.8 GB/s on 16-64 KiB
 * records against libsodium's ~1.35 GB/s; at 1400 bytes the five calls
 * cost what libsodium's one does (~2.2-2.7 µs), so the chacha20-poly1305
 * plugin gives OpenSSL the large records only (core/aead.ts bySize).
 *
 * The symbols come from the node binary (Node exports OpenSSL for native
 * addons), so nothing outside Node is needed. Where koffi or the symbols
 * are missing, the loaders return null and the plugins use libsodium or
 * node:crypto.
 *
 * Per record: EVP_*Init_ex with only the IV on a context that already has
 * the key, one Update for the AD (when there is one), one for the data,
 * Final, and a ctrl to get or set the tag. A key (a CipherState's Buffer)
 * used more than OWN_CONTEXT_AFTER times gets contexts of its own; before
 * that, a shared context is keyed on every call, because a handshake key
 * seals or opens once or twice and a context of its own would cost more
 * than it saves (measured: ~8 % fewer AES handshakes per CPU-second when
 * every key got one). Own contexts hold a copy of the key that is compared
 * on every call, so a key buffer rewritten in place can never be used with
 * a stale schedule; they are freed (OpenSSL wipes them) when the key
 * buffer is garbage collected.
 */
import { createRequire } from 'node:module';
import { noiseNonce, withAt, type InPlaceAead } from './aead.ts';

type Koffi = typeof import('koffi');
type Pointer = unknown;

const TAG_LENGTH = 16;
/** EVP_CTRL_AEAD_GET_TAG / SET_TAG: the same numbers for GCM and ChaCha20-Poly1305. */
const EVP_CTRL_AEAD_GET_TAG = 0x10;
const EVP_CTRL_AEAD_SET_TAG = 0x11;

interface Evp {
  aes256gcm(): Pointer;
  chacha20poly1305(): Pointer;
  ctxNew(): Pointer;
  ctxFree(ctx: Pointer): void;
  encryptInit(ctx: Pointer, cipher: Pointer | null, engine: null, key: Uint8Array | null, iv: Uint8Array | null): number;
  decryptInit(ctx: Pointer, cipher: Pointer | null, engine: null, key: Uint8Array | null, iv: Uint8Array | null): number;
  encryptUpdate(ctx: Pointer, out: Uint8Array | null, outLength: number[], input: Uint8Array, inputLength: number): number;
  decryptUpdate(ctx: Pointer, out: Uint8Array | null, outLength: number[], input: Uint8Array, inputLength: number): number;
  encryptFinal(ctx: Pointer, out: Uint8Array, outLength: number[]): number;
  decryptFinal(ctx: Pointer, out: Uint8Array, outLength: number[]): number;
  ctrl(ctx: Pointer, type: number, arg: number, ptr: Uint8Array): number;
}

/** koffi's bindings to EVP, made once per process (both loaders share them); null when koffi cannot load. */
let evpBinding: Evp | null | undefined;

function boundEvp(): Evp | null {
  if (evpBinding === undefined) {
    try {
      evpBinding = bindEvp(createRequire(import.meta.url)('koffi') as Koffi);
    } catch {
      evpBinding = null;
    }
  }
  return evpBinding;
}

function bindEvp(koffi: Koffi): Evp {
  // The process itself: Node's own OpenSSL. The functions are koffi's own, called directly.
  const lib = koffi.load(null as unknown as string);
  return {
    aes256gcm: lib.func('void *EVP_aes_256_gcm()'),
    chacha20poly1305: lib.func('void *EVP_chacha20_poly1305()'),
    ctxNew: lib.func('void *EVP_CIPHER_CTX_new()'),
    ctxFree: lib.func('void EVP_CIPHER_CTX_free(void *ctx)'),
    encryptInit: lib.func('int EVP_EncryptInit_ex(void *ctx, void *cipher, void *engine, const uint8_t *key, const uint8_t *iv)'),
    decryptInit: lib.func('int EVP_DecryptInit_ex(void *ctx, void *cipher, void *engine, const uint8_t *key, const uint8_t *iv)'),
    encryptUpdate: lib.func('int EVP_EncryptUpdate(void *ctx, uint8_t *out, _Out_ int *outl, const uint8_t *in, int inl)'),
    decryptUpdate: lib.func('int EVP_DecryptUpdate(void *ctx, uint8_t *out, _Out_ int *outl, const uint8_t *in, int inl)'),
    encryptFinal: lib.func('int EVP_EncryptFinal_ex(void *ctx, uint8_t *out, _Out_ int *outl)'),
    decryptFinal: lib.func('int EVP_DecryptFinal_ex(void *ctx, uint8_t *out, _Out_ int *outl)'),
    ctrl: lib.func('int EVP_CIPHER_CTX_ctrl(void *ctx, int type, int arg, uint8_t *ptr)'),
  } as Evp;
}

/** Uses of a key through the shared contexts before it gets its own. */
const OWN_CONTEXT_AFTER = 4;

/** What is known of one key: its uses, then its own contexts (created per direction). */
interface Keyed {
  uses: number;
  /** A copy of the key the own contexts were keyed with; null until they exist. */
  key: Buffer | null;
  seal: Pointer | null;
  open: Pointer | null;
}

/** AES-256-GCM (Noise's AESGCM nonce) through Node's OpenSSL, or null when it cannot be reached here. */
export function loadOpenSslAesGcm(): InPlaceAead | null {
  return loadOpenSsl((evp) => evp.aes256gcm(), 'BE');
}

/** ChaCha20-Poly1305 (Noise's ChaChaPoly nonce) through Node's OpenSSL, or null when it cannot be reached here. */
export function loadOpenSslChaCha(): InPlaceAead | null {
  return loadOpenSsl((evp) => evp.chacha20poly1305(), 'LE');
}

/** An AEAD with a 12-byte IV and a 16-byte tag, by its EVP_CIPHER, with Noise's nonce in `order`. */
function loadOpenSsl(pick: (evp: Evp) => Pointer, order: 'BE' | 'LE'): InPlaceAead | null {
  const evp = boundEvp();
  if (evp === null) return null;
  let cipher: Pointer;
  try {
    cipher = pick(evp);
    if (cipher === null) return null;
  } catch {
    return null;
  }
  const { nonce, set: setNonce } = noiseNonce(order);
  const written = [0];
  const contexts = new WeakMap<Buffer, Keyed>();
  const freeing = new FinalizationRegistry<Pointer[]>((ctxs) => {
    for (const ctx of ctxs) evp.ctxFree(ctx);
  });

  const newContext = (direction: 'seal' | 'open', key: Buffer | null): Pointer => {
    const ctx = evp.ctxNew();
    if (ctx === null) throw new Error('EVP_CIPHER_CTX_new failed');
    const init = direction === 'seal' ? evp.encryptInit : evp.decryptInit;
    if (init(ctx, cipher, null, key, null) !== 1) throw new Error('EVP_CipherInit_ex failed');
    return ctx;
  };
  let shared: { seal: Pointer; open: Pointer };
  try {
    shared = { seal: newContext('seal', null), open: newContext('open', null) };
  } catch {
    return null;
  }
  /** The context for `key` in one direction; see the file comment. A shared one still needs the key. */
  const contextFor = (key: Buffer, direction: 'seal' | 'open'): Pointer => {
    let keyed = contexts.get(key);
    if (keyed === undefined) {
      keyed = { uses: 0, key: null, seal: null, open: null };
      contexts.set(key, keyed);
    }
    if (keyed.key === null) {
      if (++keyed.uses <= OWN_CONTEXT_AFTER) return shared[direction];
      keyed.key = Buffer.from(key);
    } else if (!keyed.key.equals(key)) {
      key.copy(keyed.key);
      keyed.seal = keyed.open = null; // the old contexts are freed with the others below
    }
    let ctx = keyed[direction];
    if (ctx === null) {
      ctx = newContext(direction, key);
      freeing.register(key, [ctx]);
      keyed[direction] = ctx;
    }
    return ctx;
  };

  return withAt({
    encryptInto(key, counter, ad, plaintext, out) {
      const ctx = contextFor(key, 'seal');
      setNonce(counter);
      if (evp.encryptInit(ctx, null, null, ctx === shared.seal ? key : null, nonce) !== 1) throw new Error('EVP_EncryptInit_ex failed');
      if (ad.length > 0 && evp.encryptUpdate(ctx, null, written, ad, ad.length) !== 1) throw new Error('EVP_EncryptUpdate (ad) failed');
      const n = plaintext.length;
      if (n > 0 && evp.encryptUpdate(ctx, out, written, plaintext, n) !== 1) throw new Error('EVP_EncryptUpdate failed');
      if (evp.encryptFinal(ctx, out, written) !== 1) throw new Error('EVP_EncryptFinal_ex failed');
      if (evp.ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LENGTH, out.subarray(n, n + TAG_LENGTH)) !== 1) throw new Error('EVP_CTRL_AEAD_GET_TAG failed');
    },
    decryptInto(key, counter, ad, ciphertext, out) {
      const n = ciphertext.length - TAG_LENGTH;
      if (n < 0) return false;
      const ctx = contextFor(key, 'open');
      setNonce(counter);
      let ok =
        evp.decryptInit(ctx, null, null, ctx === shared.open ? key : null, nonce) === 1 &&
        (ad.length === 0 || evp.decryptUpdate(ctx, null, written, ad, ad.length) === 1) &&
        (n === 0 || evp.decryptUpdate(ctx, out, written, ciphertext.subarray(0, n), n) === 1);
      // The tag is read before Final, which compares it: `out` may be the same memory.
      ok = ok && evp.ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LENGTH, ciphertext.subarray(n, n + TAG_LENGTH)) === 1;
      ok = ok && evp.decryptFinal(ctx, out, written) === 1;
      // Like libsodium: no unauthenticated plaintext is left behind.
      if (!ok) out.fill(0, 0, n);
      return ok;
    },
  });
}
