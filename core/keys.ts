/**
 * Static keys on disk and in the config.
 *
 * A key field in the config holds either the key itself (base64 of 32 bytes,
 * as `wg genkey` prints it) or the path of a file holding that text. Private
 * key files are created with mode 0600 in a directory made 0700, and created
 * atomically: when a server and a client start at the same moment on one
 * machine and both find `keys/client.key` missing, exactly one key wins and
 * both use it.
 *
 * Everything here is synchronous: it runs once at start-up, and being
 * synchronous means two callers in one process can never interleave.
 */
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  fchmodSync,
  fsyncSync,
  linkSync,
  mkdirSync,
  openSync,
  readFileSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { dirname, resolve } from 'node:path';
import { DshieldError, ErrorCodes } from './errors.ts';
import { generateKeyPair, keyPairFromPrivate, KEY_LENGTH, type KeyPair } from './x25519.ts';

/** Base64 (standard alphabet, padded) of a 32-byte key. */
export function encodeKey(key: Uint8Array): string {
  return Buffer.from(key.buffer, key.byteOffset, key.byteLength).toString('base64');
}

const BASE64_32 = /^[A-Za-z0-9+/]{43}=$/;
/** Near a key's length, in the base64 alphabet, not rooted: a mistyped key rather than a file name. */
const LOOKS_LIKE_BASE64 = /^[A-Za-z0-9+_-][A-Za-z0-9+/_-]{37,47}={0,2}$/;

/**
 * Decodes base64 of exactly 32 bytes (surrounding whitespace ignored).
 * Throws DshieldError(KEY) naming `what` otherwise; the message never contains the value.
 */
export function decodeKey(text: string, what: string): Buffer {
  const trimmed = typeof text === 'string' ? text.trim() : '';
  if (!BASE64_32.test(trimmed)) {
    throw new DshieldError(ErrorCodes.KEY, `${what}: not a key (expected base64 of 32 bytes, as "wg genkey" prints)`);
  }
  const key = Buffer.from(trimmed, 'base64');
  if (key.length !== KEY_LENGTH) {
    throw new DshieldError(ErrorCodes.KEY, `${what}: not a key (expected base64 of 32 bytes, as "wg genkey" prints)`);
  }
  return key;
}

/**
 * True when a config value is meant as an inline key rather than a path:
 * a well-formed key, or 38 to 48 base64 characters (a key with a character
 * lost or added in copying). A path like "keys/server.key" has a dot, which
 * base64 never has. A mistyped key is then reported as a malformed key
 * instead of being taken for a missing file (or, worse, a file to create).
 */
export function isInlineKey(ref: string): boolean {
  const trimmed = ref.trim();
  return BASE64_32.test(trimmed) || LOOKS_LIKE_BASE64.test(trimmed);
}

/** `keys/server.key` -> `keys/server.pub`; any other name gets `.pub` appended. */
export function publicKeyPath(privateKeyPath: string): string {
  return privateKeyPath.endsWith('.key') ? privateKeyPath.slice(0, -'.key'.length) + '.pub' : privateKeyPath + '.pub';
}

/** `keys/client.pub` -> `keys/client.key`, or undefined when the name does not end in `.pub`. */
export function privateKeyPathFor(publicKeyFile: string): string | undefined {
  return publicKeyFile.endsWith('.pub') ? publicKeyFile.slice(0, -'.pub'.length) + '.key' : undefined;
}

function errnoCode(err: unknown): string | undefined {
  return err !== null && typeof err === 'object' && 'code' in err ? String((err as { code: unknown }).code) : undefined;
}

/**
 * Reads a key field: the inline base64 key, or the file at `ref` (relative to
 * `baseDir`) holding one. Throws DshieldError(KEY) naming `what` and the file
 * when the file is missing, unreadable or holds anything but one key.
 */
export function readKeyRef(ref: string, baseDir: string, what: string): Buffer {
  if (isInlineKey(ref)) return decodeKey(ref, what);
  return readKeyFile(resolve(baseDir, ref), ref, what);
}

function readKeyFile(file: string, ref: string, what: string): Buffer {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOENT') throw new DshieldError(ErrorCodes.KEY, `${what}: ${ref} does not exist`, { detail: { file } });
    throw new DshieldError(ErrorCodes.KEY, `${what}: cannot read ${ref} (${code ?? String(err)})`, { detail: { file } });
  }
  return decodeKey(text, `${what} (${ref})`);
}

/**
 * Creates `path` holding exactly `text` with `mode`, or returns false when
 * `path` already exists. The content is written to a temporary file first
 * and hard-linked into place, so nobody ever reads a half-written key and a
 * concurrent creator cannot overwrite it (link fails with EEXIST, like O_EXCL).
 */
function createFileExclusive(path: string, text: string, mode: number): boolean {
  const tmp = `${path}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
  const fd = openSync(tmp, 'wx', mode);
  try {
    // The umask may have narrowed or widened nothing we care about; say the mode exactly.
    fchmodSync(fd, mode);
    writeSync(fd, text);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  try {
    linkSync(tmp, path);
    return true;
  } catch (err) {
    if (errnoCode(err) === 'EEXIST') return false;
    throw err;
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // Already gone: nothing to clean.
    }
  }
}

function makeKeyDir(path: string): void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
}

/**
 * Writes a key pair: the private key to `path` (mode 0600) and the public key
 * to `publicKeyPath(path)` (mode 0644), creating the directory (0700) if needed.
 * Never overwrites: returns false, writing nothing, when `path` already exists.
 * An existing public key file is left alone.
 */
export function writePrivateKeyFile(path: string, keyPair: KeyPair): boolean {
  makeKeyDir(path);
  if (!createFileExclusive(path, encodeKey(keyPair.privateKey) + '\n', 0o600)) return false;
  createFileExclusive(publicKeyPath(path), encodeKey(keyPair.publicKey) + '\n', 0o644);
  return true;
}

/**
 * The key pair in `path`, created (with its .pub file) when the file is
 * missing. Safe when several processes call it at once for one path: they all
 * get the same pair. Restores a missing .pub file from the private key.
 * Throws DshieldError(KEY) when the file exists but holds no valid key.
 */
export function ensureKeyPair(path: string, what = path): { keyPair: KeyPair; created: boolean } {
  const file = resolve(path);
  let created = false;
  try {
    readFileSync(file);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') {
      throw new DshieldError(ErrorCodes.KEY, `${what}: cannot read ${path} (${errnoCode(err) ?? String(err)})`);
    }
    try {
      created = writePrivateKeyFile(file, generateKeyPair());
    } catch (writeErr) {
      throw new DshieldError(
        ErrorCodes.KEY,
        `${what}: cannot create ${path} (${errnoCode(writeErr) ?? String(writeErr)})`,
        { cause: writeErr },
      );
    }
  }
  const keyPair = keyPairFromPrivate(readKeyFile(file, path, what));
  try {
    createFileExclusive(publicKeyPath(file), encodeKey(keyPair.publicKey) + '\n', 0o644);
  } catch {
    // The public file is a convenience copy; the private key is what matters.
  }
  return { keyPair, created };
}

/**
 * Names of options and fields whose values are secrets, for redaction:
 * anything mentioning key, psk, password, secret or token, except the
 * public keys, which are meant to be shared.
 */
export function isSecretName(name: string): boolean {
  if (name === 'publicKey' || name === 'serverPublicKey') return false;
  return /key|psk|password|secret|token/i.test(name);
}

/**
 * A deep copy of `config` with every secret-named value (see isSecretName:
 * private keys, psk, passwords, tokens, at any depth, plugin options
 * included) replaced by "<redacted>", for printing (`dshield check`) and logs.
 * Public keys stay readable.
 */
export function redactConfig<T>(config: T): T {
  const walk = (value: unknown): unknown => {
    if (Array.isArray(value)) return value.map(walk);
    if (value === null || typeof value !== 'object') return value;
    const out: Record<string, unknown> = {};
    for (const [name, v] of Object.entries(value)) {
      out[name] = isSecretName(name) && v !== undefined && v !== null && v !== '' ? '<redacted>' : walk(v);
    }
    return out;
  };
  return walk(config) as T;
}
