/**
 * The Noise Protocol Framework (revision 34), reduced to what dshield uses:
 * the handshake patterns IK and IKpsk2 with X25519, an AEAD from a
 * CipherPlugin (ChaChaPoly or AESGCM) and the hash BLAKE2s or SHA256.
 *
 *   IK:      <- s  ...  -> e, es, s, ss   <- e, ee, se
 *   IKpsk2:  <- s  ...  -> e, es, s, ss   <- e, ee, se, psk
 *
 * Error contract: every failure to process a message from the peer (short or
 * malformed message, failed authentication, low-order public key) throws a
 * NoiseError (a DshieldError with code PROTOCOL); nothing else escapes. A
 * HandshakeState that failed once refuses further use, so a caller cannot
 * continue from a half-updated state by mistake.
 */
import { createHash, createHmac } from 'node:crypto';
import { BLAKE2S_LENGTH, blake2s, hkdfBlake2s } from './blake2s.ts';
import { DshieldError, ErrorCodes } from './errors.ts';
import type { CipherPlugin, NoiseHash } from './types.ts';
import { dh as x25519, ephemeralFromPrivate, generateEphemeral, type EphemeralKey, type KeyPair, KEY_LENGTH } from './x25519.ts';

/** The Noise hash functions; BLAKE2s is dshield's default. */
export type HashName = NoiseHash;
export const HASH_NAMES: readonly HashName[] = ['BLAKE2s', 'SHA256', 'BLAKE2b', 'SHA512'];
export type HandshakePattern = 'IK' | 'IKpsk2';

/** What Noise needs of its hash function: HASH over one or two parts, its HKDF, HASHLEN. */
interface HashSuite {
  readonly length: number;
  hash(a: Uint8Array, b?: Uint8Array): Buffer;
  /**
   * HKDF(chainingKey, ikm) as Noise defines it (HMAC-based): `outputs` ×
   * HASHLEN bytes in one new Buffer, output i at [i × HASHLEN, (i + 1) × HASHLEN).
   */
  hkdf(chainingKey: Uint8Array, ikm: Uint8Array, outputs: 2 | 3): Buffer;
}

/** A hash from node:crypto (an object per call, ~2-4 µs each at handshake sizes). */
function nodeSuite(name: string, length: number): HashSuite {
  const hmac = (key: Uint8Array, a: Uint8Array, b?: Uint8Array): Buffer => {
    const m = createHmac(name, key).update(a);
    if (b !== undefined) m.update(b);
    return m.digest();
  };
  return {
    length,
    hash(a, b) {
      const h = createHash(name).update(a);
      if (b !== undefined) h.update(b);
      return h.digest();
    },
    hkdf(chainingKey, ikm, outputs) {
      const temp = hmac(chainingKey, ikm);
      const out1 = hmac(temp, ONE);
      const out2 = hmac(temp, out1, TWO);
      return Buffer.concat(outputs === 2 ? [out1, out2] : [out1, out2, hmac(temp, out2, THREE)]);
    },
  };
}

/**
 * BLAKE2s, the default, runs in JavaScript (core/blake2s.ts): at these sizes
 * node:crypto's per-call set-up costs several times the hashing itself.
 */
const HASH_SUITES: Record<HashName, HashSuite> = {
  BLAKE2s: { length: BLAKE2S_LENGTH, hash: blake2s, hkdf: hkdfBlake2s },
  SHA256: nodeSuite('sha256', 32),
  BLAKE2b: nodeSuite('blake2b512', 64),
  SHA512: nodeSuite('sha512', 64),
};
const ONE = Uint8Array.of(1);
const TWO = Uint8Array.of(2);
const THREE = Uint8Array.of(3);
const TAG_LENGTH = 16;
const PSK_LENGTH = 32;
/** Noise caps every message at 65535 bytes. */
export const MAX_MESSAGE_LENGTH = 65535;
/**
 * Counters stay below 2^53 - 1 so they remain exact JavaScript numbers; Noise
 * reserves 2^64 - 1, which we never get near. A CipherState refuses to go on
 * once its counter reaches this value.
 */
export const MAX_COUNTER = Number.MAX_SAFE_INTEGER;

const EMPTY = Buffer.alloc(0);

/** A handshake or transport message failed; the peer gets no detail. */
export class NoiseError extends DshieldError {
  constructor(message: string, cause?: unknown) {
    super(ErrorCodes.PROTOCOL, message, cause === undefined ? undefined : { cause });
    this.name = 'NoiseError';
  }
}

export function protocolName(pattern: HandshakePattern, cipher: CipherPlugin, hash: HashName): string {
  return `Noise_${pattern}_25519_${cipher.noiseName}_${hash}`;
}

// ---------------------------------------------------------------------------
// CipherState

/**
 * A key and a counter nonce. Without a key, encryption is the identity (Noise
 * handshakes use that before the first DH). The counter only advances on
 * success, as Noise requires.
 */
export class CipherState {
  private key: Buffer | null;
  /** The next nonce. */
  counter = 0;

  constructor(
    readonly cipher: CipherPlugin,
    key?: Buffer,
  ) {
    this.key = key ?? null;
  }

  hasKey(): boolean {
    return this.key !== null;
  }

  /** A copy of the key, for a data-path thread that opens records under it (null before Split). */
  exportKey(): Buffer | null {
    return this.key === null ? null : Buffer.from(this.key);
  }

  /**
   * Throws NoiseError when the counter is exhausted (the session must rekey or close first).
   * `out`: where the caller would like the result (see CipherPlugin.encrypt); use what is returned.
   */
  encryptWithAd(ad: Uint8Array, plaintext: Uint8Array, out?: Buffer): Buffer {
    if (this.key === null) return Buffer.from(plaintext);
    if (this.counter >= MAX_COUNTER) throw new NoiseError('record counter exhausted');
    const sealed = this.cipher.encrypt(this.key, this.counter, ad, plaintext, out);
    this.counter++;
    return sealed;
  }

  /**
   * Returns null when authentication fails (or the counter is exhausted); the counter then stays.
   * `out` as in CipherPlugin.decrypt: after a failure its bytes are undefined.
   */
  decryptWithAd(ad: Uint8Array, ciphertext: Uint8Array, out?: Buffer): Buffer | null {
    if (this.key === null) return Buffer.from(ciphertext);
    if (this.counter >= MAX_COUNTER) return null;
    const plaintext = this.cipher.decrypt(this.key, this.counter, ad, ciphertext, out);
    if (plaintext !== null) this.counter++;
    return plaintext;
  }

  /**
   * Explicit-nonce encryption for datagram records, which carry their
   * counter in the clear and may arrive in any order. Leaves `counter`
   * alone: the caller owns the nonce sequence and must never repeat one.
   * Throws NoiseError without a key or for a counter outside [0, MAX_COUNTER).
   */
  encryptAt(nonce: number, ad: Uint8Array, plaintext: Uint8Array, out?: Buffer): Buffer {
    if (this.key === null) throw new NoiseError('no key to encrypt with');
    if (!(nonce >= 0 && nonce < MAX_COUNTER)) throw new NoiseError('record counter exhausted');
    return this.cipher.encrypt(this.key, nonce, ad, plaintext, out);
  }

  /** Explicit-nonce decryption (see encryptAt). Null when authentication fails; `counter` is untouched. */
  decryptAt(nonce: number, ad: Uint8Array, ciphertext: Uint8Array, out?: Buffer): Buffer | null {
    if (this.key === null || !(nonce >= 0 && nonce < MAX_COUNTER)) return null;
    return this.cipher.decrypt(this.key, nonce, ad, ciphertext, out);
  }
}

// ---------------------------------------------------------------------------
// SymmetricState

export interface SymmetricSnapshot {
  readonly chainingKey: Buffer;
  readonly hashValue: Buffer;
}

export class SymmetricState {
  private chainingKey: Buffer;
  private hashValue: Buffer;
  private cipherState: CipherState;
  private readonly suite: HashSuite;

  /** `from`: continue from a snapshot() instead of starting from the protocol name. */
  constructor(
    private readonly cipher: CipherPlugin,
    hash: HashName,
    name: string,
    from?: SymmetricSnapshot,
  ) {
    this.suite = HASH_SUITES[hash];
    this.cipherState = new CipherState(cipher);
    if (from !== undefined) {
      this.chainingKey = from.chainingKey;
      this.hashValue = from.hashValue;
      return;
    }
    const nameBytes = Buffer.from(name, 'ascii');
    if (nameBytes.length <= this.suite.length) {
      // A short name is used as h directly, zero-padded (e.g. Noise_IK_25519_AESGCM_SHA256 is 28 bytes).
      this.hashValue = Buffer.alloc(this.suite.length);
      nameBytes.copy(this.hashValue);
    } else {
      this.hashValue = this.suite.hash(nameBytes);
    }
    this.chainingKey = this.hashValue;
  }

  /**
   * h and ck so far, for a state that has no key yet (the CipherState is not
   * part of it). Nothing here mutates the buffers it holds (every mix makes
   * new ones), so a snapshot may be shared by any number of states.
   */
  snapshot(): SymmetricSnapshot {
    return { chainingKey: this.chainingKey, hashValue: this.hashValue };
  }

  mixKey(ikm: Uint8Array): void {
    const out = this.suite.hkdf(this.chainingKey, ikm, 2);
    const n = this.suite.length;
    this.chainingKey = out.subarray(0, n);
    this.cipherState = new CipherState(this.cipher, out.subarray(n, n + 32));
  }

  mixHash(data: Uint8Array): void {
    this.hashValue = this.suite.hash(this.hashValue, data);
  }

  mixKeyAndHash(ikm: Uint8Array): void {
    const out = this.suite.hkdf(this.chainingKey, ikm, 3);
    const n = this.suite.length;
    this.chainingKey = out.subarray(0, n);
    this.mixHash(out.subarray(n, 2 * n));
    this.cipherState = new CipherState(this.cipher, out.subarray(2 * n, 2 * n + 32));
  }

  handshakeHash(): Buffer {
    return Buffer.from(this.hashValue);
  }

  hasKey(): boolean {
    return this.cipherState.hasKey();
  }

  encryptAndHash(plaintext: Uint8Array): Buffer {
    const ct = this.cipherState.encryptWithAd(this.hashValue, plaintext);
    this.mixHash(ct);
    return ct;
  }

  /** Throws NoiseError when authentication fails. */
  decryptAndHash(ciphertext: Uint8Array): Buffer {
    const pt = this.cipherState.decryptWithAd(this.hashValue, ciphertext);
    if (pt === null) throw new NoiseError('handshake message failed to authenticate');
    this.mixHash(ciphertext);
    return pt;
  }

  /** The two transport CipherStates: [initiator -> responder, responder -> initiator]. */
  split(): [CipherState, CipherState] {
    const out = this.suite.hkdf(this.chainingKey, EMPTY, 2);
    const n = this.suite.length;
    return [new CipherState(this.cipher, out.subarray(0, 32)), new CipherState(this.cipher, out.subarray(n, n + 32))];
  }
}

// ---------------------------------------------------------------------------
// HandshakeState

/**
 * Where every handshake with the same protocol, prologue and responder key
 * starts (three hashes in): the same for all of a server's handshakes, so it
 * is computed once per combination. Public values only. Bounded; a
 * combination that falls out is simply computed again. Looked up by
 * comparing bytes, newest first: a key string built from the bytes cost
 * ~1 µs per handshake (encoding, then hashing a long string).
 */
interface Premessage {
  readonly name: string;
  readonly prologue: Uint8Array;
  readonly responderStatic: Uint8Array;
  readonly state: SymmetricSnapshot;
}
const premessageStates: Premessage[] = [];
const PREMESSAGE_CACHE_SIZE = 32;

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function startSymmetric(
  cipher: CipherPlugin,
  hash: HashName,
  name: string,
  prologue: Uint8Array,
  responderStatic: Uint8Array,
): SymmetricState {
  for (const known of premessageStates) {
    if (known.name === name && sameBytes(known.responderStatic, responderStatic) && sameBytes(known.prologue, prologue)) {
      return new SymmetricState(cipher, hash, name, known.state);
    }
  }
  const symmetric = new SymmetricState(cipher, hash, name);
  symmetric.mixHash(prologue);
  symmetric.mixHash(responderStatic);
  if (premessageStates.length >= PREMESSAGE_CACHE_SIZE) premessageStates.pop();
  premessageStates.unshift({
    name,
    prologue: Uint8Array.from(prologue),
    responderStatic: Uint8Array.from(responderStatic),
    state: symmetric.snapshot(),
  });
  return symmetric;
}

type Token = 'e' | 's' | 'es' | 'ss' | 'ee' | 'se' | 'psk';

const PATTERNS: Record<HandshakePattern, Token[][]> = {
  IK: [
    ['e', 'es', 's', 'ss'],
    ['e', 'ee', 'se'],
  ],
  IKpsk2: [
    ['e', 'es', 's', 'ss'],
    ['e', 'ee', 'se', 'psk'],
  ],
};

export type DhFunction = (privateKey: Uint8Array, publicKey: Uint8Array) => Buffer;

export interface HandshakeOptions {
  pattern: HandshakePattern;
  initiator: boolean;
  cipher: CipherPlugin;
  hash: HashName;
  /** Bytes both sides must agree on (bound into the handshake hash). Default empty. */
  prologue?: Uint8Array;
  staticKey: KeyPair;
  /** Initiator: the responder's static public key, known in advance (required for IK). */
  remoteStaticKey?: Buffer;
  /** IKpsk2: the 32-byte PSK. The responder may instead call setPsk() after reading message 1. */
  psk?: Buffer;
  /** The ephemeral PRIVATE key to use instead of a fresh one. For test vectors only. */
  ephemeralPrivateKey?: Buffer;
  /**
   * Replaces X25519 for the DHs with this side's static key (it must behave
   * the same); lets trial readers share DH results. The ephemeral key does its own.
   */
  dh?: DhFunction;
}

/** The transport keys after the handshake, oriented for this side. */
export interface TransportKeys {
  send: CipherState;
  receive: CipherState;
  handshakeHash: Buffer;
}

/**
 * One side of one IK / IKpsk2 handshake. Message order: the initiator calls
 * writeMessage then readMessage; the responder readMessage then writeMessage.
 * After that, isComplete is true and split() gives the transport keys.
 */
export class HandshakeState {
  readonly pattern: HandshakePattern;
  readonly initiator: boolean;
  private readonly symmetric: SymmetricState;
  private readonly staticKey: KeyPair;
  private ephemeral: EphemeralKey | null = null;
  private readonly injectedEphemeral: Buffer | undefined;
  private remoteStatic: Buffer | null;
  private remoteEphemeral: Buffer | null = null;
  private psk: Buffer | null = null;
  private readonly dh: DhFunction;
  private messageIndex = 0;
  private failed = false;

  constructor(opts: HandshakeOptions) {
    this.pattern = opts.pattern;
    this.initiator = opts.initiator;
    this.staticKey = opts.staticKey;
    this.injectedEphemeral = opts.ephemeralPrivateKey;
    this.dh = opts.dh ?? x25519;
    if (opts.staticKey.privateKey.length !== KEY_LENGTH || opts.staticKey.publicKey.length !== KEY_LENGTH) {
      throw new RangeError('static key pair must be two 32-byte keys');
    }
    if (opts.initiator && opts.remoteStaticKey?.length !== KEY_LENGTH) {
      throw new RangeError('IK initiator needs the 32-byte remote static public key');
    }
    this.remoteStatic = opts.initiator ? Buffer.from(opts.remoteStaticKey!) : null;
    if (opts.psk !== undefined) this.setPsk(opts.psk);

    // Pre-message "<- s": the responder's static key is known to both sides.
    this.symmetric = startSymmetric(
      opts.cipher,
      opts.hash,
      protocolName(opts.pattern, opts.cipher, opts.hash),
      opts.prologue ?? EMPTY,
      opts.initiator ? this.remoteStatic! : this.staticKey.publicKey,
    );
  }

  get usesPsk(): boolean {
    return this.pattern === 'IKpsk2';
  }

  /** Sets the PSK (IKpsk2). The responder may call this after reading message 1, before writing message 2. */
  setPsk(psk: Buffer): void {
    if (!this.usesPsk) throw new RangeError(`pattern ${this.pattern} takes no PSK`);
    if (psk.length !== PSK_LENGTH) throw new RangeError('PSK must be 32 bytes');
    this.psk = Buffer.from(psk);
  }

  /** The peer's static public key: known from the start (initiator) or after message 1 (responder). */
  get remoteStaticKey(): Buffer | null {
    return this.remoteStatic;
  }

  get isComplete(): boolean {
    return this.messageIndex === PATTERNS[this.pattern].length;
  }

  handshakeHash(): Buffer {
    return this.symmetric.handshakeHash();
  }

  private isMyTurnToWrite(): boolean {
    // Message 0 is the initiator's, message 1 the responder's.
    return (this.messageIndex % 2 === 0) === this.initiator;
  }

  writeMessage(payload: Uint8Array = EMPTY): Buffer {
    if (this.failed) throw new NoiseError('handshake already failed');
    if (this.isComplete || !this.isMyTurnToWrite()) throw new Error('writeMessage called out of turn');
    const tokens = PATTERNS[this.pattern][this.messageIndex]!;
    if (tokens.includes('psk') && this.psk === null) throw new Error('IKpsk2 needs the PSK before writing this message');
    const parts: Buffer[] = [];
    for (const token of tokens) {
      switch (token) {
        case 'e': {
          this.ephemeral =
            this.injectedEphemeral !== undefined ? ephemeralFromPrivate(this.injectedEphemeral) : generateEphemeral();
          parts.push(this.ephemeral.publicKey);
          this.symmetric.mixHash(this.ephemeral.publicKey);
          if (this.usesPsk) this.symmetric.mixKey(this.ephemeral.publicKey);
          break;
        }
        case 's':
          parts.push(this.symmetric.encryptAndHash(this.staticKey.publicKey));
          break;
        case 'psk':
          this.symmetric.mixKeyAndHash(this.psk!);
          break;
        default:
          this.symmetric.mixKey(this.dhFor(token));
      }
    }
    parts.push(this.symmetric.encryptAndHash(payload));
    this.messageIndex++;
    const message = Buffer.concat(parts);
    if (message.length > MAX_MESSAGE_LENGTH) throw new RangeError('Noise message would exceed 65535 bytes');
    return message;
  }

  /** Returns the decrypted payload. Throws NoiseError on any failure; the state is then unusable. */
  readMessage(message: Uint8Array): Buffer {
    if (this.failed) throw new NoiseError('handshake already failed');
    if (this.isComplete || this.isMyTurnToWrite()) throw new Error('readMessage called out of turn');
    const tokens = PATTERNS[this.pattern][this.messageIndex]!;
    if (tokens.includes('psk') && this.psk === null) throw new Error('IKpsk2 needs the PSK before reading this message');
    try {
      if (message.length > MAX_MESSAGE_LENGTH) throw new NoiseError('handshake message too long');
      let offset = 0;
      for (const token of tokens) {
        switch (token) {
          case 'e': {
            this.remoteEphemeral = pieceOf(message, offset, KEY_LENGTH);
            offset += KEY_LENGTH;
            this.symmetric.mixHash(this.remoteEphemeral);
            if (this.usesPsk) this.symmetric.mixKey(this.remoteEphemeral);
            break;
          }
          case 's': {
            const length = KEY_LENGTH + (this.symmetric.hasKey() ? TAG_LENGTH : 0);
            const sealed = pieceOf(message, offset, length);
            offset += length;
            this.remoteStatic = this.symmetric.decryptAndHash(sealed);
            break;
          }
          case 'psk':
            this.symmetric.mixKeyAndHash(this.psk!);
            break;
          default:
            this.symmetric.mixKey(this.dhFor(token));
        }
      }
      const payload = this.symmetric.decryptAndHash(message.subarray(offset));
      this.messageIndex++;
      return payload;
    } catch (err) {
      this.failed = true;
      if (err instanceof NoiseError) throw err;
      // x25519 throws for low-order points and malformed keys: a failed handshake, not a crash.
      throw new NoiseError('handshake message rejected', err);
    }
  }

  /** The DH for a token, from this side's point of view (first letter = initiator's key). */
  private dhFor(token: Token): Buffer {
    switch (token) {
      case 'ee':
        return this.localE().dh(this.remoteE());
      case 'ss':
        return this.dh(this.staticKey.privateKey, this.remoteS());
      case 'es':
        return this.initiator ? this.localE().dh(this.remoteS()) : this.dh(this.staticKey.privateKey, this.remoteE());
      case 'se':
        return this.initiator ? this.dh(this.staticKey.privateKey, this.remoteE()) : this.localE().dh(this.remoteS());
      default:
        return fail(`not a DH token: ${token}`);
    }
  }

  // Methods rather than closures in dhFor: tsx names every closure it creates, which shows up per handshake.
  private localE(): EphemeralKey {
    return this.ephemeral ?? fail('no local ephemeral');
  }

  private remoteE(): Buffer {
    return this.remoteEphemeral ?? fail('no remote ephemeral');
  }

  private remoteS(): Buffer {
    return this.remoteStatic ?? fail('no remote static');
  }

  /** The transport keys, oriented for this side. Only after the handshake completed. */
  split(): TransportKeys {
    if (!this.isComplete || this.failed) throw new Error('split() before the handshake completed');
    const [initiatorToResponder, responderToInitiator] = this.symmetric.split();
    return this.initiator
      ? { send: initiatorToResponder, receive: responderToInitiator, handshakeHash: this.handshakeHash() }
      : { send: responderToInitiator, receive: initiatorToResponder, handshakeHash: this.handshakeHash() };
  }
}

function fail(why: string): never {
  throw new NoiseError(why);
}

/** A copy of message[offset, offset + length); throws NoiseError when the message ends first. */
function pieceOf(message: Uint8Array, offset: number, length: number): Buffer {
  if (message.length - offset < length) throw new NoiseError('handshake message too short');
  return Buffer.from(message.subarray(offset, offset + length));
}

/**
 * The DH function readInitiation's trial states share: DH(our static key,
 * public key) is made once per public key and kept in `withStatic`.
 * Returned as an unnamed arrow: tsx names every closure bound to a name,
 * which costs a defineProperty per handshake.
 */
function sharingStaticDh(
  ourStatic: Uint8Array,
  withStatic: Map<string, Buffer>,
  known: ((publicKey: Uint8Array) => Buffer | undefined) | undefined,
): DhFunction {
  return (priv, pub) => {
    // The states made here pass our static key by reference: a DH with any other key is not ours to share.
    if (priv !== ourStatic) return x25519(priv, pub);
    const id = Buffer.from(pub.buffer, pub.byteOffset, pub.byteLength).toString('base64');
    let out = withStatic.get(id);
    if (out === undefined) {
      out = known?.(pub) ?? x25519(priv, pub);
      withStatic.set(id, out);
    }
    return out;
  };
}

/**
 * Responder: read message 1 when the initiator may have used either of
 * `patterns` (the pattern is part of the protocol name, so the server cannot
 * know it before it knows the client). Both trials share the DHs with the
 * static key, so a garbage message costs one DH, a good one two.
 * `known(publicKey)`: DH(our static key, publicKey) when the caller already
 * has it (see staticShared), else undefined.
 * Returns the state that authenticated the message, with staticShared =
 * DH(our static key, the initiator's static key), which is the same in every
 * handshake between the two keys: a caller may keep it for `known`. Throws
 * NoiseError.
 */
export function readInitiation(
  opts: Omit<HandshakeOptions, 'pattern' | 'initiator' | 'remoteStaticKey' | 'dh' | 'psk'>,
  message: Uint8Array,
  patterns: readonly HandshakePattern[],
  known?: (publicKey: Uint8Array) => Buffer | undefined,
): { state: HandshakeState; payload: Buffer; staticShared: Buffer } {
  /** DH(our static key, public key) by public key (base64). */
  const withStatic = new Map<string, Buffer>();
  const sharedDh = sharingStaticDh(opts.staticKey.privateKey, withStatic, known);
  // Made only when every trial failed: an Error captures a stack trace, which is not free per handshake.
  let lastError: unknown;
  for (const pattern of patterns) {
    // Named one by one: V8 (Node 20) takes a slow path of ~2 µs for `{ ...opts, more }`.
    const state = new HandshakeState({
      pattern,
      initiator: false,
      dh: sharedDh,
      cipher: opts.cipher,
      hash: opts.hash,
      prologue: opts.prologue,
      staticKey: opts.staticKey,
      ephemeralPrivateKey: opts.ephemeralPrivateKey,
    });
    let payload: Buffer;
    try {
      payload = state.readMessage(message);
    } catch (err) {
      lastError = err;
      continue;
    }
    // Message 1 ended with the ss DH, made through sharedDh with the initiator's static key.
    const staticShared = withStatic.get(state.remoteStaticKey!.toString('base64'))!;
    return { state, payload, staticShared };
  }
  if (lastError === undefined) throw new NoiseError('no pattern to try');
  throw lastError instanceof NoiseError ? lastError : new NoiseError('handshake message rejected', lastError);
}
