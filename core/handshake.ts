/**
 * The dshield/1 handshake pieces that stream sessions (core/session.ts) and
 * datagram sessions (core/session-datagram.ts) share: what message 1 and
 * message 2 carry, and how the server decides whether to answer.
 *
 *   message 1 (client -> server): Noise IK(psk2) message 1,
 *             payload = TAI64N timestamp (12 bytes) || UTF-8 JSON object
 *   message 2 (server -> client): Noise message 2, payload = UTF-8 JSON object
 *
 * How the messages travel (a record on a stream link; a datagram with
 * indices around it) is each session kind's business.
 */
import { DshieldError, ErrorCodes } from './errors.ts';
import { HandshakeState, readInitiation, type HandshakePattern, type HashName } from './noise.ts';
import { ReplayGuard, TIMESTAMP_LENGTH, tai64nNow } from './replay.ts';
import type { AuthPlugin, CipherPlugin, ClientIdentity } from './types.ts';
import type { KeyPair } from './x25519.ts';

export const PROLOGUE = Buffer.from('dshield/1', 'ascii');

/** Why a client that got no answer got none: the server stays silent for all of these. */
export const TIMEOUT_ADVICE =
  "it may not know this client's key or PSK, or its key is not the pinned client.serverPublicKey (which may be a man in the middle)";

export function protocolError(message: string, cause?: unknown): DshieldError {
  return new DshieldError(ErrorCodes.PROTOCOL, message, cause === undefined ? undefined : { cause });
}

export function serverKeyMismatch(cause?: unknown): DshieldError {
  return new DshieldError(
    ErrorCodes.SERVER_KEY_MISMATCH,
    "the server's handshake answer failed to authenticate: the server's key does not match the pinned " +
      "client.serverPublicKey (this may be a man in the middle), or the PSK differs from the server's",
    cause === undefined ? undefined : { cause },
  );
}

export function jsonBytes(value: Record<string, unknown>): Buffer {
  return Buffer.from(JSON.stringify(value), 'utf8');
}

/** An empty payload is {}; anything but a JSON object is null. */
export function parseJsonObject(bytes: Buffer): Record<string, unknown> | null {
  if (bytes.length === 0) return {};
  try {
    const value: unknown = JSON.parse(bytes.toString('utf8'));
    if (value === null || typeof value !== 'object' || Array.isArray(value)) return null;
    return value as Record<string, unknown>;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------------------
// Client (initiator)

export interface InitiatorKeys {
  cipher: CipherPlugin;
  hash: HashName;
  staticKey: KeyPair;
  serverPublicKey: Buffer;
  psk?: Buffer;
}

/** Makes fresh initiator states (the first handshake, retransmissions, rekeys): IKpsk2 when a PSK is given. */
export function initiatorFactory(keys: InitiatorKeys): () => HandshakeState {
  const pattern: HandshakePattern = keys.psk !== undefined ? 'IKpsk2' : 'IK';
  return () =>
    new HandshakeState({
      pattern,
      initiator: true,
      cipher: keys.cipher,
      hash: keys.hash,
      prologue: PROLOGUE,
      staticKey: keys.staticKey,
      remoteStaticKey: keys.serverPublicKey,
      psk: keys.psk,
    });
}

/** Message 1 with a fresh timestamp (so a replay of it is refused) and `payload`. */
export function writeInitiation(hs: HandshakeState, payload: Record<string, unknown>): Buffer {
  return hs.writeMessage(Buffer.concat([tai64nNow(), jsonBytes(payload)]));
}

/**
 * Reads message 2 and returns the server's session parameters. Throws
 * DshieldError SERVER_KEY_MISMATCH when it fails to authenticate, PROTOCOL
 * when it authenticates but carries no JSON object.
 */
export function readResponse(hs: HandshakeState, message2: Buffer): Record<string, unknown> {
  let payload: Buffer;
  try {
    payload = hs.readMessage(message2);
  } catch (err) {
    throw serverKeyMismatch(err);
  }
  const params = parseJsonObject(payload);
  if (params === null) throw protocolError("the server's handshake answer carries no valid session parameters (JSON object)");
  return params;
}

// ---------------------------------------------------------------------------
// Server (responder)

export interface ResponderContext {
  cipher: CipherPlugin;
  hash: HashName;
  staticKey: KeyPair;
  auth: AuthPlugin;
  replay: ReplayGuard;
}

export type Initiation =
  | { ok: true; state: HandshakeState; clientKey: Buffer; identity: ClientIdentity; json: Record<string, unknown> }
  | { ok: false; reason: string };

const BOTH_PATTERNS: readonly HandshakePattern[] = ['IK', 'IKpsk2'];

/**
 * DH(server static key, client static key) by client key (base64), per
 * server key pair: the one DH of a handshake that comes out the same every
 * time, kept as WireGuard keeps its precomputed static-static secret. Only
 * authorized keys go in, so it is bounded by them whatever strangers send
 * (and by a cap, oldest out first). Holding these adds nothing to what
 * reading this process's memory gives away already: the server's private key.
 */
const staticSecrets = new WeakMap<KeyPair, Map<string, Buffer>>();
const STATIC_SECRETS_CAP = 16_384;

function staticSecretsOf(staticKey: KeyPair): Map<string, Buffer> {
  let secrets = staticSecrets.get(staticKey);
  if (secrets === undefined) staticSecrets.set(staticKey, (secrets = new Map()));
  return secrets;
}

/**
 * Server: authenticate a message 1 and decide whether to answer it. The
 * replay guard records the timestamp only after the key is authorized, so
 * its memory is bounded by the authorized keys. `expectedKey`: a rekey must
 * come from the session's client. Reasons (for logs only, never sent):
 * 'bad handshake' | 'unknown client key' | 'psk mismatch' | 'replayed initiation'
 * | 'client key changed' | 'auth plugin failed: ...'.
 */
export function checkInitiation(ctx: ResponderContext, message1: Buffer, expectedKey?: Buffer): Initiation {
  const secrets = staticSecretsOf(ctx.staticKey);
  let state: HandshakeState;
  let payload: Buffer;
  let staticShared: Buffer;
  try {
    ({ state, payload, staticShared } = readInitiation(
      { cipher: ctx.cipher, hash: ctx.hash, prologue: PROLOGUE, staticKey: ctx.staticKey },
      message1,
      BOTH_PATTERNS,
      (publicKey) => secrets.get(Buffer.from(publicKey.buffer, publicKey.byteOffset, publicKey.byteLength).toString('base64')),
    ));
  } catch {
    return { ok: false, reason: 'bad handshake' };
  }
  const clientKey = state.remoteStaticKey!;
  if (expectedKey !== undefined && !clientKey.equals(expectedKey)) return { ok: false, reason: 'client key changed' };
  let identity: ClientIdentity | null;
  let psk: Buffer | undefined;
  try {
    identity = ctx.auth.authorize(clientKey);
    if (identity === null) return { ok: false, reason: 'unknown client key' };
    psk = ctx.auth.psk(clientKey);
  } catch (err) {
    return { ok: false, reason: `auth plugin failed: ${err instanceof Error ? err.message : String(err)}` };
  }
  // The client must use a PSK exactly when the server expects one for it.
  if ((psk !== undefined) !== state.usesPsk) return { ok: false, reason: 'psk mismatch' };
  if (psk !== undefined) {
    try {
      state.setPsk(psk);
    } catch {
      return { ok: false, reason: 'psk mismatch' };
    }
  }
  if (payload.length < TIMESTAMP_LENGTH) return { ok: false, reason: 'bad handshake' };
  const json = parseJsonObject(payload.subarray(TIMESTAMP_LENGTH));
  if (json === null) return { ok: false, reason: 'bad handshake' };
  const clientKeyB64 = clientKey.toString('base64');
  if (!secrets.has(clientKeyB64)) {
    if (secrets.size >= STATIC_SECRETS_CAP) secrets.delete(secrets.keys().next().value!);
    secrets.set(clientKeyB64, staticShared);
  }
  if (!ctx.replay.accept(clientKeyB64, payload.subarray(0, TIMESTAMP_LENGTH))) {
    return { ok: false, reason: 'replayed initiation' };
  }
  return { ok: true, state, clientKey, identity, json };
}
