/**
 * X25519 with raw 32-byte keys (as WireGuard writes them), on libsodium
 * (through sodium-native) when it loads, else on node:crypto. Both compute
 * the same function (RFC 7748, scalars clamped at use) and both refuse a
 * low-order public key (all-zero result) by throwing.
 *
 * Why two: a server's handshake is mostly X25519 (one keygen, three DHs),
 * and node:crypto wraps every key in a KeyObject. Measured here, a DH costs
 * about the same on both (~35 us), but node:crypto's keygen takes ~35 us
 * (libsodium ~18), each peer key costs a ~7 us import, and the KeyObjects
 * are garbage to collect; going through DER is far worse (PKCS#8 import
 * ~370 us, SPKI export ~65 us). A whole server completed about a fifth more
 * handshakes per CPU-second on libsodium. sodium-native ships prebuilt
 * binaries; where none fits, node:crypto does it all, as follows:
 *  - private KeyObjects are kept in a small cache: a static key is imported
 *    once, and generateKeyPair() puts its keys there as it makes them;
 *  - public keys come in as JWK (~7 us) and are cached too, since each side
 *    of a handshake uses each peer key twice;
 *  - an ephemeral key (generateEphemeral) never leaves node:crypto: only its
 *    public half is needed raw, and keygen hands that out as JWK.
 *
 * No KeyObject is exported as JWK after the fact: Node 20 holds the key's
 * lock while it builds the JWK strings, and a garbage collection in between
 * that frees the finished keygen job of that same key takes the lock again
 * and hangs the process (seen here, in a loop of generate + export). Asking
 * keygen itself for the JWK is safe: its job is alive until it returns.
 *
 * Long-lived keys (generateKeyPair, publicKeyFromPrivate) always come from
 * node:crypto: that is rare, and OpenSSL writes private keys clamped, as
 * WireGuard's tools do.
 */
import { sodiumNative } from './sodium.ts';
import { createPrivateKey, createPublicKey, diffieHellman, generateKeyPairSync, type KeyObject } from 'node:crypto';

const PKCS8_PREFIX = Buffer.from('302e020100300506032b656e04220420', 'hex');
const SPKI_PREFIX = Buffer.from('302a300506032b656e032100', 'hex');

export const KEY_LENGTH = 32;

export interface KeyPair {
  privateKey: Buffer;
  publicKey: Buffer;
}

/** A key pair for one handshake, made by generateEphemeral. */
export interface EphemeralKey {
  readonly publicKey: Buffer;
  /** DH(this key, publicKey), as dh() does it (throws for a low-order key). */
  dh(publicKey: Uint8Array): Buffer;
}

/** The operations on the handshake path, one implementation per library. */
export interface X25519Backend {
  readonly name: 'libsodium' | 'node:crypto';
  dh(privateKey: Uint8Array, publicKey: Uint8Array): Buffer;
  generateEphemeral(): EphemeralKey;
}

function checkLengths(privateKey: Uint8Array, publicKey: Uint8Array): void {
  if (privateKey.length !== KEY_LENGTH) throw new RangeError('X25519 private key must be 32 bytes');
  if (publicKey.length !== KEY_LENGTH) throw new RangeError('X25519 public key must be 32 bytes');
}

// ---------------------------------------------------------------------------
// libsodium

/** The part of sodium-native used here. */
interface SodiumScalarMult {
  crypto_scalarmult(q: Uint8Array, n: Uint8Array, p: Uint8Array): void;
  crypto_scalarmult_base(q: Uint8Array, n: Uint8Array): void;
  randombytes_buf(buffer: Uint8Array): void;
}


function sodiumBackend(sodium: SodiumScalarMult): X25519Backend {
  /** Throws (sodium-native does) when the result is all zeros: a low-order public key. */
  const scalarMult = (privateKey: Uint8Array, publicKey: Uint8Array): Buffer => {
    const shared = Buffer.allocUnsafe(KEY_LENGTH);
    sodium.crypto_scalarmult(shared, privateKey, publicKey);
    return shared;
  };

  // A class rather than an object of closures: tsx names every closure it makes, once per handshake here.
  class SodiumEphemeral implements EphemeralKey {
    readonly publicKey = Buffer.allocUnsafe(KEY_LENGTH);
    // Its own memory, not a slice of Node's shared pool.
    private readonly privateKey = Buffer.allocUnsafeSlow(KEY_LENGTH);

    constructor() {
      sodium.randombytes_buf(this.privateKey);
      sodium.crypto_scalarmult_base(this.publicKey, this.privateKey);
    }

    dh(publicKey: Uint8Array): Buffer {
      checkLengths(this.privateKey, publicKey);
      return scalarMult(this.privateKey, publicKey);
    }
  }

  return {
    name: 'libsodium',
    dh(privateKey, publicKey) {
      checkLengths(privateKey, publicKey);
      return scalarMult(privateKey, publicKey);
    },
    generateEphemeral: () => new SodiumEphemeral(),
  };
}

// ---------------------------------------------------------------------------
// node:crypto

/**
 * KeyObjects by raw key, least recently used dropped first, so a static key
 * in use stays in whatever else passes through.
 */
class KeyObjectCache {
  private readonly byRaw = new Map<string, KeyObject>();

  constructor(private readonly size: number) {}

  get(id: string): KeyObject | undefined {
    const key = this.byRaw.get(id);
    if (key !== undefined) {
      this.byRaw.delete(id);
      this.byRaw.set(id, key);
    }
    return key;
  }

  set(id: string, key: KeyObject): KeyObject {
    if (this.byRaw.size >= this.size) this.byRaw.delete(this.byRaw.keys().next().value!);
    this.byRaw.set(id, key);
    return key;
  }
}

const privateKeys = new KeyObjectCache(64);
/**
 * A handshake adds at most two: the peer's ephemeral and static keys. Room
 * for a few hundred handshakes, so a client that reconnects or rekeys while
 * others connect still finds its static key here.
 */
const publicKeys = new KeyObjectCache(512);

function privateKeyObject(raw: Uint8Array): KeyObject {
  if (raw.length !== KEY_LENGTH) throw new RangeError('X25519 private key must be 32 bytes');
  const id = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('base64');
  return (
    privateKeys.get(id) ??
    privateKeys.set(id, createPrivateKey({ key: Buffer.concat([PKCS8_PREFIX, raw]), format: 'der', type: 'pkcs8' }))
  );
}

function publicKeyObject(raw: Uint8Array): KeyObject {
  if (raw.length !== KEY_LENGTH) throw new RangeError('X25519 public key must be 32 bytes');
  const x = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).toString('base64url');
  return publicKeys.get(x) ?? publicKeys.set(x, createPublicKey({ key: { kty: 'OKP', crv: 'X25519', x }, format: 'jwk' }));
}

// @types/node lists no overload for a JWK public key next to a KeyObject private key; Node 20 makes both.
const generateWithJwkPublic = generateKeyPairSync as unknown as (
  type: 'x25519',
  options: { publicKeyEncoding: { type: 'spki'; format: 'jwk' } },
) => { publicKey: JsonWebKey; privateKey: KeyObject };

class NodeEphemeral implements EphemeralKey {
  readonly publicKey: Buffer;
  private readonly privateKey: KeyObject;

  constructor() {
    const { publicKey, privateKey } = generateWithJwkPublic('x25519', { publicKeyEncoding: { type: 'spki', format: 'jwk' } });
    const raw = Buffer.from(publicKey.x ?? '', 'base64url');
    // Anything else would mean node:crypto changed what it hands out, which must not pass silently.
    if (raw.length !== KEY_LENGTH) throw new Error('node:crypto generated an X25519 public key that is not 32 bytes');
    this.publicKey = raw;
    this.privateKey = privateKey;
  }

  dh(publicKey: Uint8Array): Buffer {
    return diffieHellman({ privateKey: this.privateKey, publicKey: publicKeyObject(publicKey) });
  }
}

const nodeBackend: X25519Backend = {
  name: 'node:crypto',
  dh: (privateKey, publicKey) =>
    diffieHellman({ privateKey: privateKeyObject(privateKey), publicKey: publicKeyObject(publicKey) }),
  generateEphemeral: () => new NodeEphemeral(),
};

// ---------------------------------------------------------------------------

const sodium = sodiumNative<SodiumScalarMult>();

/** Both implementations, so tests can hold them against each other; `libsodium` is null where it does not load. */
export const X25519_BACKENDS: { readonly libsodium: X25519Backend | null; readonly node: X25519Backend } = {
  libsodium: sodium === null ? null : sodiumBackend(sodium),
  node: nodeBackend,
};

const backend = X25519_BACKENDS.libsodium ?? X25519_BACKENDS.node;

/** Which implementation the handshakes use. */
export const X25519_BACKEND_NAME = backend.name;

/**
 * The shared secret DH(priv, pub). Throws for a low-order public key (the
 * result would be all zeros): callers treat that as a failed handshake.
 */
export function dh(privateKey: Uint8Array, publicKey: Uint8Array): Buffer {
  return backend.dh(privateKey, publicKey);
}

/** A fresh key pair for one handshake; its private half is never handed out. */
export function generateEphemeral(): EphemeralKey {
  return backend.generateEphemeral();
}

class FixedEphemeral implements EphemeralKey {
  readonly publicKey: Buffer;
  private readonly privateKey: Buffer;

  constructor(privateKey: Uint8Array) {
    this.privateKey = Buffer.from(privateKey);
    this.publicKey = publicKeyFromPrivate(this.privateKey);
  }

  dh(publicKey: Uint8Array): Buffer {
    return dh(this.privateKey, publicKey);
  }
}

/** An EphemeralKey from a given private key: for test vectors, which fix the ephemeral keys. */
export function ephemeralFromPrivate(privateKey: Uint8Array): EphemeralKey {
  return new FixedEphemeral(privateKey);
}

export function generateKeyPair(): KeyPair {
  const { privateKey, publicKey } = generateKeyPairSync('x25519');
  const priv = Buffer.from(privateKey.export({ format: 'der', type: 'pkcs8' }).subarray(PKCS8_PREFIX.length));
  const pub = Buffer.from(publicKey.export({ format: 'der', type: 'spki' }).subarray(SPKI_PREFIX.length));
  privateKeys.set(priv.toString('base64'), privateKey);
  return { privateKey: priv, publicKey: pub };
}

export function publicKeyFromPrivate(privateKey: Uint8Array): Buffer {
  const pub = createPublicKey(privateKeyObject(privateKey)).export({ format: 'der', type: 'spki' });
  return Buffer.from(pub.subarray(SPKI_PREFIX.length));
}

export function keyPairFromPrivate(privateKey: Uint8Array): KeyPair {
  return { privateKey: Buffer.from(privateKey), publicKey: publicKeyFromPrivate(privateKey) };
}
