/**
 * Handshake driver, run in the client namespace through the core API:
 *
 *   node --import tsx bench/drivers/handshakes.ts CONFIG KEYS_JSON SECONDS
 *
 * CONFIG is a client config (transport, cipher, server, server key);
 * KEYS_JSON a list of client private keys the server knows. One lane per key
 * (a client's initiations must carry increasing timestamps, so each key
 * handshakes in sequence): dial (over tcp or ws, a new connection; over udp,
 * a new socket, as the client binds for each session), complete the Noise
 * handshake, close the session as a leaving client does (a CLOSE record),
 * again, until SECONDS are up. Prints `RESULT {json}` with the number of
 * completed handshakes.
 */
import { readFileSync } from 'node:fs';
import { loadConfig } from '../../core/config.ts';
import { decodeKey } from '../../core/keys.ts';
import { createRuntime, loadCommonPlugins, staticKeyFrom } from '../../core/runtime.ts';
import { connectSession, type ClientHandshakeOptions, type Session } from '../../core/session.ts';
import { connectDatagramSession } from '../../core/session-datagram.ts';
import { bindForServer } from '../../core/datagram-dial.ts';

const [configPath, keysPath, secondsText] = process.argv.slice(2);
const config = await loadConfig({ configPath, materializeKeys: 'client' });
const rt = await createRuntime(config, { mode: 'client' });
const { transport, cipher, auth, hash } = await loadCommonPlugins(rt, 'client');
const serverPublicKey = decodeKey(config.client.serverPublicKey, 'client.serverPublicKey');
const keys = (JSON.parse(readFileSync(keysPath!, 'utf8')) as string[]).map((k) => staticKeyFrom(k, 'bench key'));
const log = rt.log.child('bench');

let done = 0;
let errors = 0;
let firstError: string | undefined;
const started = performance.now();
const deadline = started + Number(secondsText) * 1000;
await Promise.all(
  keys.map(async (staticKey) => {
    // One lane's options serve all its handshakes: only the sockets and the Noise states are new each time.
    const handshake: ClientHandshakeOptions = { cipher, hash, staticKey, serverPublicKey, psk: auth.psk(), payload: {}, handshakeTimeoutMs: 5_000, log };
    while (performance.now() < deadline) {
      try {
        let session: Session;
        if (transport.type === 'datagram') {
          const bound = await bindForServer(transport, config.client.server, rt.signal);
          session = await connectDatagramSession(bound.endpoint, bound.server, handshake);
        } else {
          session = await connectSession(await transport.dial(config.client.server, rt.signal), handshake);
        }
        done++;
        session.close();
      } catch (err) {
        errors++;
        firstError ??= (err as Error).message;
      }
    }
  }),
);
const seconds = (performance.now() - started) / 1000;
console.log(`RESULT ${JSON.stringify({ handshakes: done, seconds, errors, firstError, lanes: keys.length })}`);
await rt.close();
process.exit(0);
