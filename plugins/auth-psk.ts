/**
 * auth psk: the client-key authorization of auth keys, plus a pre-shared key
 * mixed into the handshake (Noise IKpsk2). Someone who learns a client's
 * private key still cannot connect without the PSK, and the PSK adds a
 * symmetric secret to the key exchange.
 *
 * The shared `psk` is used by every client unless an entry of `clients`
 * carries its own. A client uses its `psk` option for the one the server
 * expects of it. Both sides must agree, or the server stays silent.
 */
import { statSync } from 'node:fs';
import { resolve } from 'node:path';
import { checkClientEntries, clientLookup, type ClientLookup } from '../core/clients.ts';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes, isDshieldError } from '../core/errors.ts';
import { isInlineKey, readKeyRef } from '../core/keys.ts';
import type { AuthPlugin, ClientEntry, Logger } from '../core/types.ts';

export interface PskAuthOptions {
  /** Base64 of 32 bytes, or a path (relative to the config's directory) to a file holding it. */
  psk?: string;
  /** More clients, { name, publicKey, psk? }, added to server.clients; `psk` overrides the shared one. */
  clients?: unknown[];
}

const HOW_TO_MAKE = 'generate one with `openssl rand -base64 32`';

function validateClients(value: unknown): string | undefined {
  return Array.isArray(value) ? undefined : 'must be a list of { name, publicKey, psk? }';
}

/**
 * A PSK option value: the key itself or a file holding it. Throws
 * DshieldError(KEY) naming `what`, never quoting the value (it may be a
 * mistyped secret).
 */
function loadPsk(value: unknown, what: string, baseDir: string, log: Logger): Buffer {
  if (typeof value !== 'string' || value.trim() === '') {
    throw new DshieldError(
      ErrorCodes.KEY,
      `${what} is missing: set it to base64 of 32 random bytes or to a file holding them (${HOW_TO_MAKE})`,
    );
  }
  let psk: Buffer;
  try {
    psk = readKeyRef(value, baseDir, what);
  } catch (err) {
    if (isDshieldError(err)) {
      const hint = isInlineKey(value) ? HOW_TO_MAKE : `create it with \`openssl rand -base64 32 > ${value.trim()}\``;
      throw new DshieldError(err.code, `${err.message}; ${hint}`, { cause: err, detail: err.detail });
    }
    throw err;
  }
  warnIfShared(value, baseDir, what, log);
  return psk;
}

/** A PSK file others can read is a PSK others know. */
function warnIfShared(value: string, baseDir: string, what: string, log: Logger): void {
  if (process.platform === 'win32') return;
  try {
    const mode = statSync(resolve(baseDir, value.trim())).mode;
    if ((mode & 0o077) !== 0) log.warn(`${what}: the file ${value.trim()} is readable by other users; chmod 600 it`);
  } catch {
    // An inline key (no such file) or a file that vanished since: nothing to check.
  }
}

export default definePlugin<'auth', PskAuthOptions>({
  kind: 'auth',
  name: 'psk',
  description: 'client keys plus a pre-shared key in the handshake (Noise IKpsk2)',
  options: {
    psk: {
      type: 'string',
      required: true,
      description: `the pre-shared key: base64 of 32 bytes, or a file holding it (${HOW_TO_MAKE})`,
    },
    clients: {
      type: 'any',
      description: 'more authorized clients, [{ name, publicKey, psk? }]; a psk here replaces the shared one for that client',
      validate: validateClients,
    },
  },
  create(options, ctx): AuthPlugin {
    const shared = loadPsk(options.psk, 'option "psk"', ctx.baseDir, ctx.log);

    let lookup: ClientLookup = () => null;
    let perClient = new Map<string, Buffer>();
    const index = (serverClients: readonly ClientEntry[]): void => {
      const clients = checkClientEntries({ 'server.clients': serverClients, 'option "clients"': options.clients });
      const psks = new Map<string, Buffer>();
      for (const client of clients) {
        const withPsk = client.entries.filter(({ entry }) => entry.psk !== undefined);
        if (withPsk.length > 1) {
          throw new DshieldError(ErrorCodes.KEY, `${withPsk[1]!.label} gives a second psk for the same client as ${withPsk[0]!.label}: keep one`);
        }
        const [own] = withPsk;
        if (own) psks.set(client.identity.publicKey, loadPsk(own.entry.psk, `${own.label} psk`, ctx.baseDir, ctx.log));
      }
      if (clients.length === 0) {
        ctx.log.warn('no client is authorized yet: every handshake will be refused until server.clients lists one');
      }
      lookup = clientLookup(clients);
      perClient = psks;
    };
    // The client never authorizes anyone; the server's list means nothing there.
    if (ctx.mode === 'server') index(ctx.config.server.clients);

    return {
      name: 'psk',
      authorize: (clientPublicKey) => lookup(clientPublicKey),
      // A copy each time: the handshake may wipe the key it was given.
      psk(clientPublicKey?: Buffer): Buffer {
        const own = Buffer.isBuffer(clientPublicKey) ? perClient.get(clientPublicKey.toString('base64')) : undefined;
        return Buffer.from(own ?? shared);
      },
      setClients: index,
    };
  },
});
