/**
 * auth keys: a client may connect when its static public key is listed in
 * server.clients (or in this plugin's `clients` option). The handshake proves
 * the client holds the matching private key; no pre-shared key (plain Noise IK).
 */
import { checkClientEntries, clientLookup, type ClientLookup } from '../core/clients.ts';
import { definePlugin } from '../core/define.ts';
import type { AuthPlugin, ClientEntry } from '../core/types.ts';

export interface KeysAuthOptions {
  /** More clients, { name, publicKey (base64) }, added to server.clients. */
  clients?: unknown[];
}

function validateClients(value: unknown): string | undefined {
  return Array.isArray(value) ? undefined : 'must be a list of { name, publicKey }';
}

export default definePlugin<'auth', KeysAuthOptions>({
  kind: 'auth',
  name: 'keys',
  description: 'clients authorized by their static public key (server.clients)',
  options: {
    clients: {
      type: 'any',
      description: 'more authorized clients, [{ name, publicKey }], added to server.clients',
      validate: validateClients,
    },
  },
  create(options, ctx): AuthPlugin {
    const index = (serverClients: readonly ClientEntry[]): ClientLookup => {
      const clients = checkClientEntries({ 'server.clients': serverClients, 'option "clients"': options.clients });
      if (clients.length === 0) {
        ctx.log.warn('no client is authorized yet: every handshake will be refused until server.clients lists one');
      }
      return clientLookup(clients);
    };
    // The client never authorizes anyone; the server's list means nothing there.
    let lookup: ClientLookup = ctx.mode === 'server' ? index(ctx.config.server.clients) : () => null;
    return {
      name: 'keys',
      authorize: (clientPublicKey) => lookup(clientPublicKey),
      psk: () => undefined,
      setClients(clients) {
        lookup = index(clients);
      },
    };
  },
});
