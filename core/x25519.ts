/**
 * X25519 on node:crypto with raw 32-byte keys (as WireGuard writes them).
 * Keys travel as Buffers; node:crypto wants KeyObjects. Importing a private
 * key is the expensive part (measured here: PKCS#8 import ~760 us against
 * ~45 us for the DH itself), so private KeyObjects are kept in a small cache:
 * the static key is imported once, and the ephemeral keys this module
 * generates are put there as they are made, never imported at all. Public
 * keys come in as JWK (~11 us; SPKI DER ~116 us).
 */
import { createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto';

const PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

export const KEY_LENGTH = 32;

export interface KeyPair {
  privateKey: Buffer;
  publicKey: Buffer;
}

/** Private KeyObjects by raw key; oldest dropped first. A handshake adds at most one. */
const privateKeys = new Map<string, KeyObject>();
const PRIVATE_CACHE_SIZE = 64;

function remember(raw: Uint8Array, key: KeyObject): KeyObject {
  if (privateKeys.size >= PRIVATE_CACHE_SIZE) privateKeys.delete(privateKeys.keys().next().value!);
  privateKeys.set(Buffer.from(raw).toString('base64'), key);
  return key;
}

function privateKeyObject(raw: Uint8Array): KeyObject {
  if (raw.length !== KEY_LENGTH) throw new RangeError('X25519 private key must be 32 bytes');
  const cached = privateKeys.get(Buffer.from(raw).toString('base64'));
  if (cached) return cached;
  return remember(raw, createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, raw]), format: 'der', type: 'pkcs8' }));
}

function publicKeyObject(raw: Uint8Array): KeyObject {
  if (raw.length !== KEY_LENGTH) throw new RangeError('X25519 public key must be 32 bytes');
  return createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x: Buffer.from(raw).toString('base64url') }, format: 'jwk' });
}

export function generateKeyPair(): KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('x25519');
  const priv = Buffer.from(privateKey.export({ format: 'der', type: 'pkcs8' }).subarray(PKCS8_PREFIX.length));
  const pub = Buffer.from(publicKey.export({ format: 'der', type: 'spki' }).subarray(SPKI_PREFIX.length));
  remember(priv, privateKey);
  return { privateKey: priv, publicKey: pub };
}

export function publicKeyFromPrivate(privateKey: Uint8Array): Buffer {
  const pub = createPublicKey(privateKeyObject(privateKey)).export({ format: 'der', type: 'spki' });
  return Buffer.from(pub.subarray(SPKI_PREFIX.length));
}

/**
 * The shared secret DH(priv, pub). Throws for a low-order public key (the
 * result would be all zeros): callers treat that as a failed handshake.
 */
export function dh(privateKey: Uint8Array, publicKey: Uint8Array): Buffer {
  return diffieHellman({ privateKey: privateKeyObject(privateKey), publicKey: publicKeyObject(publicKey) });
}

export function keyPairFromPrivate(privateKey: Uint8Array): KeyPair {
  return { privateKey: Buffer.from(privateKey), publicKey: publicKeyFromPrivate(privateKey) };
}
