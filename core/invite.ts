/**
 * Invites: one string that takes a new client from nothing to connected.
 *
 * `dshield invite laptop` (on the server) makes a key pair for the client,
 * authorizes its public key in server.clientsFile, and prints
 *
 *   dshield://<base64url of JSON { v: 1, name, server, serverPublicKey,
 *              transport, cipher, hash, auth, psk?, privateKey }>
 *
 * The client runs `dshield --mode client --invite <string>`. The string holds
 * the client's private key (and the PSK, if any): it is a secret, to be sent
 * the way a password would be.
 */
import { closeSync, mkdirSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { DshieldError, ErrorCodes } from './errors.ts';
import { parseHostPort } from './hostport.ts';
import { decodeKey, encodeKey, readKeyRef } from './keys.ts';
import { generateKeyPair, publicKeyFromPrivate } from './x25519.ts';
import { HASH_NAMES } from './noise.ts';
import { readClientsFile } from './config.ts';
import type { ClientEntry, NoiseHash, PluginRef, ResolvedConfig, ResolvedPluginRef, UserConfig } from './types.ts';

export const INVITE_PREFIX = 'dshield://';

/** What an invite carries (version 1). Keys are base64 of 32 bytes. */
export interface InvitePayload {
  v: 1;
  /** The client's name on the server (for display). */
  name?: string;
  /** Where to dial: "host:port" or a ws:// / wss:// URL. */
  server: string;
  serverPublicKey: string;
  transport: PluginRef;
  cipher: string;
  hash: NoiseHash;
  /** The auth plugin's name; with `psk`, it is given { psk }. */
  auth?: string;
  psk?: string;
  privateKey: string;
}

export interface CreatedInvite {
  /** The connection string to give the client. Secret: it holds the client's private key. */
  invite: string;
  /** The entry added to server.clientsFile. */
  client: ClientEntry;
  /** The client's private key, base64. */
  privateKey: string;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$/;

/**
 * Authorizes a new client `name` and returns its invite. Appends
 * { name, publicKey } to server.clientsFile (created 0600 if missing).
 * `address` is what the client dials; default server.publicAddress, else
 * server.listen when that is a concrete address.
 * Throws DshieldError(CONFIG) for a bad or duplicate name, or when no
 * dialable address is known; DshieldError(KEY) when the server key is unreadable.
 * A running server reads the clients file at start-up.
 */
export function createInvite(config: ResolvedConfig, name: string, address?: string): CreatedInvite {
  if (typeof name !== 'string' || !NAME_RE.test(name)) {
    throw new DshieldError(
      ErrorCodes.CONFIG,
      `invite: the client name must be 1-64 letters, digits, ".", "_", "@" or "-" (starting with a letter or digit), got ${JSON.stringify(name)}`,
    );
  }
  const server = inviteAddress(config, address);
  const serverPublicKey = encodeKey(publicKeyFromPrivate(readKeyRef(config.server.privateKey, config.baseDir, 'server.privateKey')));
  const psk = pskOf(config);

  const keyPair = generateKeyPair();
  const client: ClientEntry = { name, publicKey: encodeKey(keyPair.publicKey) };
  const privateKey = encodeKey(keyPair.privateKey);
  const clientsFile = resolve(config.baseDir, config.server.clientsFile);

  withFileLock(clientsFile, () => {
    const existing = readClientsFile(clientsFile);
    if (existing.some((c) => c.name === name) || config.server.clients.some((c) => c.name === name)) {
      throw new DshieldError(ErrorCodes.CONFIG, `invite: a client named "${name}" already exists; choose another name`);
    }
    writeFileAtomic(clientsFile, JSON.stringify([...existing, client], null, 2) + '\n', 0o600);
  });

  const payload: InvitePayload = {
    v: 1,
    name,
    server,
    serverPublicKey,
    transport: refForInvite(config.transport),
    cipher: config.cipher.use,
    hash: config.hash,
    auth: config.auth.use,
    ...(psk !== undefined ? { psk } : {}),
    privateKey,
  };
  return { invite: INVITE_PREFIX + Buffer.from(JSON.stringify(payload)).toString('base64url'), client, privateKey };
}

/**
 * Decodes and checks an invite. Throws DshieldError(INVITE) for anything
 * malformed; messages never quote the secrets it holds.
 */
export function decodeInvite(text: string): InvitePayload {
  const fail = (why: string): never => {
    throw new DshieldError(ErrorCodes.INVITE, `invite: ${why}`);
  };
  if (typeof text !== 'string') fail('expected a string starting with dshield://');
  const s = text.trim();
  if (!s.toLowerCase().startsWith(INVITE_PREFIX)) fail(`expected a string starting with ${INVITE_PREFIX}; copy it whole`);
  const body = s.slice(INVITE_PREFIX.length);
  if (!/^[A-Za-z0-9_-]+={0,2}$/.test(body)) fail('it is damaged (characters that cannot be in an invite); copy it whole');
  let raw: unknown;
  try {
    raw = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
  } catch {
    fail('it is damaged or cut short; copy it whole');
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) fail('it is damaged; copy it whole');
  const p = raw as Record<string, unknown>;
  if (p.v !== 1) fail(`version ${JSON.stringify(p.v)} is not one this dshield reads (it reads 1); update dshield`);

  if (typeof p.server !== 'string') fail('"server" is missing');
  const server = (p.server as string).trim();
  if (/^wss?:\/\//i.test(server)) {
    try {
      new URL(server);
    } catch {
      fail(`"server" ${JSON.stringify(server)} is not a valid URL`);
    }
  } else {
    try {
      parseHostPort(server, 'server');
    } catch {
      fail(`"server" ${JSON.stringify(server)} is not host:port or a ws:// URL`);
    }
  }
  const key = (field: string): string => {
    try {
      return encodeKey(decodeKey(p[field] as string, field));
    } catch {
      return fail(`"${field}" is missing or not a key`);
    }
  };
  const serverPublicKey = key('serverPublicKey');
  const privateKey = key('privateKey');
  const psk = p.psk === undefined ? undefined : key('psk');

  const transport = p.transport;
  const transportOk =
    (typeof transport === 'string' && transport !== '') ||
    (transport !== null &&
      typeof transport === 'object' &&
      !Array.isArray(transport) &&
      typeof (transport as { use?: unknown }).use === 'string');
  if (!transportOk) fail('"transport" must be a plugin name or { use, ...options }');
  if (typeof p.cipher !== 'string' || p.cipher === '') fail('"cipher" must be a plugin name');
  if (!HASH_NAMES.includes(p.hash as NoiseHash)) fail(`"hash" must be one of ${HASH_NAMES.join(', ')}`);
  if (p.auth !== undefined && (typeof p.auth !== 'string' || p.auth === '')) fail('"auth" must be a plugin name');
  if (p.name !== undefined && typeof p.name !== 'string') fail('"name" must be a string');

  return {
    v: 1,
    ...(p.name !== undefined ? { name: p.name as string } : {}),
    server,
    serverPublicKey,
    transport: transport as PluginRef,
    cipher: p.cipher as string,
    hash: p.hash as NoiseHash,
    ...(p.auth !== undefined ? { auth: p.auth as string } : {}),
    ...(psk !== undefined ? { psk } : {}),
    privateKey,
  };
}

/**
 * The settings an invite gives a client, as a config layer: transport,
 * cipher, hash, auth (with its psk), client.server, client.serverPublicKey
 * and client.privateKey. Throws DshieldError(INVITE) for a malformed invite.
 */
export function parseInvite(text: string): UserConfig {
  const p = decodeInvite(text);
  const auth: PluginRef | undefined = p.psk !== undefined ? { use: p.auth ?? 'psk', psk: p.psk } : p.auth;
  return {
    transport: p.transport,
    cipher: p.cipher,
    hash: p.hash,
    ...(auth !== undefined ? { auth } : {}),
    client: { server: p.server, serverPublicKey: p.serverPublicKey, privateKey: p.privateKey },
  };
}

// ---------------------------------------------------------------------------

function inviteAddress(config: ResolvedConfig, address: string | undefined): string {
  const given = address?.trim() || config.server.publicAddress.trim();
  if (given) {
    if (!/^wss?:\/\//i.test(given)) parseHostPort(given, address?.trim() ? 'invite address' : 'server.publicAddress');
    return given;
  }
  const { host } = parseHostPort(config.server.listen, 'server.listen');
  if (host === '0.0.0.0' || host === '::' || host === '[::]') {
    throw new DshieldError(
      ErrorCodes.CONFIG,
      `server.publicAddress: not set, and server.listen (${config.server.listen}) is no address a client can dial; ` +
        'set server.publicAddress to the address clients should use (e.g. vpn.example.com:8443), or pass --address',
    );
  }
  return config.server.listen;
}

/** The shared PSK of the auth plugin, base64, if it has one. */
function pskOf(config: ResolvedConfig): string | undefined {
  const psk = config.auth.options.psk;
  if (psk === undefined) return undefined;
  if (typeof psk !== 'string') {
    throw new DshieldError(ErrorCodes.KEY, `auth plugin "${config.auth.use}": option "psk" must be base64 of 32 bytes or a file holding it`);
  }
  return encodeKey(readKeyRef(psk, config.baseDir, `auth plugin "${config.auth.use}" option "psk"`));
}

function refForInvite(ref: ResolvedPluginRef): PluginRef {
  return Object.keys(ref.options).length === 0 ? ref.use : { ...ref.options, use: ref.use };
}

/** Replaces `file` with `text` in one step (a reader sees the old or the new file, never half). */
function writeFileAtomic(file: string, text: string, mode: number): void {
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    writeFileSync(tmp, text, { mode, flag: 'w' });
    renameSync(tmp, file);
  } catch (err) {
    try {
      unlinkSync(tmp);
    } catch {
      // Never created.
    }
    throw new DshieldError(ErrorCodes.CONFIG, `server.clientsFile: cannot write ${file} (${(err as { code?: string }).code ?? String(err)})`);
  }
}

const LOCK_WAIT_MS = 3_000;
const LOCK_STALE_MS = 30_000;

/** Runs `fn` holding `<file>.lock`, so two invites at once cannot drop each other's entry. */
function withFileLock(file: string, fn: () => void): void {
  const lock = `${file}.lock`;
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const deadline = Date.now() + LOCK_WAIT_MS;
  for (;;) {
    try {
      closeSync(openSync(lock, 'wx', 0o600));
      break;
    } catch (err) {
      if ((err as { code?: string }).code !== 'EEXIST') throw err;
      try {
        if (Date.now() - statSync(lock).mtimeMs > LOCK_STALE_MS) {
          unlinkSync(lock);
          continue;
        }
      } catch {
        continue; // Released meanwhile.
      }
      if (Date.now() > deadline) {
        throw new DshieldError(ErrorCodes.CONFIG, `server.clientsFile: ${lock} is held by another dshield invite; remove it if none is running`);
      }
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50);
    }
  }
  try {
    fn();
  } finally {
    try {
      unlinkSync(lock);
    } catch {
      // Already gone.
    }
  }
}
