/**
 * The server's list of authorized clients as a lookup by static public key,
 * shared by the auth plugins. Public keys are public, so a Map keyed by the
 * base64 text is as good as a constant-time comparison here.
 */
import { DshieldError, ErrorCodes } from './errors.ts';
import { decodeKey, encodeKey } from './keys.ts';
import type { ClientIdentity } from './types.ts';
import { KEY_LENGTH } from './x25519.ts';

/** The identity of a client key, or null when the key is not authorized. */
export type ClientLookup = (clientPublicKey: Buffer) => ClientIdentity | null;

/** One validated entry: its identity and the decoded key. */
export interface CheckedClient {
  identity: ClientIdentity;
  key: Buffer;
  /** Where it came from, for messages: 'server.clients[2] "bob"'. */
  label: string;
  /**
   * Every entry that listed this key (more than one when the config and a
   * plugin option both do), as written and with its label, for plugins that
   * read extra fields such as a per-client psk.
   */
  entries: { entry: Record<string, unknown>; label: string }[];
}

/**
 * Validates client entries ({ name, publicKey }) from several lists, keyed by
 * where each list comes from ('server.clients', 'option "clients"').
 * Throws DshieldError(KEY) naming the entry for a missing name, a malformed
 * key, or one key listed under two different names; the same entry listed
 * twice (config and plugin option) is kept once, with both entries.
 */
export function checkClientEntries(lists: Record<string, readonly unknown[] | undefined>): CheckedClient[] {
  const checked: CheckedClient[] = [];
  const byKey = new Map<string, CheckedClient>();
  for (const [where, entries] of Object.entries(lists)) {
    if (entries === undefined) continue;
    if (!Array.isArray(entries)) {
      throw new DshieldError(ErrorCodes.KEY, `${where} must be a list of { name, publicKey }`);
    }
    entries.forEach((raw: unknown, i) => {
      const at = `${where}[${i}]`;
      if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
        throw new DshieldError(ErrorCodes.KEY, `${at} must be { name, publicKey }`);
      }
      const entry = raw as Record<string, unknown>;
      const name = entry.name;
      if (typeof name !== 'string' || name.trim() === '') {
        throw new DshieldError(ErrorCodes.KEY, `${at}: "name" must be a non-empty string`);
      }
      const label = `${at} "${name}"`;
      if (typeof entry.publicKey !== 'string') {
        throw new DshieldError(ErrorCodes.KEY, `${label}: "publicKey" is missing (base64 of 32 bytes)`);
      }
      const key = decodeKey(entry.publicKey, `${label} publicKey`);
      const base64 = encodeKey(key);
      const earlier = byKey.get(base64);
      if (earlier) {
        if (earlier.identity.name === name) {
          earlier.entries.push({ entry, label });
          return;
        }
        throw new DshieldError(
          ErrorCodes.KEY,
          `${label} has the same public key as ${earlier.label}: each client needs its own key`,
        );
      }
      const client: CheckedClient = {
        identity: Object.freeze({ name, publicKey: base64 }),
        key,
        label,
        entries: [{ entry, label }],
      };
      byKey.set(base64, client);
      checked.push(client);
    });
  }
  return checked;
}

/** A lookup over checked entries. Anything but a 32-byte key is refused. */
export function clientLookup(clients: readonly CheckedClient[]): ClientLookup {
  const byKey = new Map<string, ClientIdentity>();
  for (const c of clients) byKey.set(c.identity.publicKey, c.identity);
  return (clientPublicKey) => {
    if (!Buffer.isBuffer(clientPublicKey) || clientPublicKey.length !== KEY_LENGTH) return null;
    return byKey.get(clientPublicKey.toString('base64')) ?? null;
  };
}

/** checkClientEntries then clientLookup, for plugins that need nothing more. */
export function buildClientIndex(lists: Record<string, readonly unknown[] | undefined>): ClientLookup {
  return clientLookup(checkClientEntries(lists));
}
