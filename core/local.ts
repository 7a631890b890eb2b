/**
 * Local mode (`npm start`): a server and a client in one process on
 * loopback, with throwaway keys, plus a small demo page to fetch through the
 * tunnel. It is the first thing a new user runs, so it needs no key files,
 * no second terminal and no internet.
 *
 * The demo page is on 127.0.0.1, which the default egress policy denies; local
 * mode allows 127.0.0.1/32 for itself only (its client runs in the same process,
 * on the same machine, so it reaches nothing the user could not reach already).
 */
import { createServer, type Server } from 'node:http';
import { generateKeyPair } from './x25519.ts';
import { startServer, type ServerHandle } from './server.ts';
import { startClient, type ClientHandle } from './client.ts';
import type { Runtime } from './runtime.ts';
import type { ResolvedConfig } from './types.ts';

export interface LocalHandle {
  server: ServerHandle;
  client: ClientHandle;
  /** The demo page's URL, e.g. http://127.0.0.1:41234/ */
  demoUrl: string;
  close(): Promise<void>;
}

/** The config local mode runs with: fresh keys, loopback only. */
export function localConfig(base: ResolvedConfig): ResolvedConfig {
  const serverKeys = generateKeyPair();
  const clientKeys = generateKeyPair();
  return {
    ...base,
    server: {
      ...base.server,
      listen: '127.0.0.1:0',
      privateKey: serverKeys.privateKey.toString('base64'),
      clients: [{ name: 'local', publicKey: clientKeys.publicKey.toString('base64') }],
      egress: { allow: [...base.server.egress.allow, '127.0.0.1/32'] },
    },
    client: {
      ...base.client,
      privateKey: clientKeys.privateKey.toString('base64'),
      serverPublicKey: serverKeys.publicKey.toString('base64'),
    },
  };
}

export async function startLocal(rt: Runtime, onConnecting?: (server: string) => void): Promise<LocalHandle> {
  const demo = await startDemoPage();
  const server = await startServer(rt);
  let client: ClientHandle;
  try {
    client = await startClient(rt, { server: server.address, onConnecting });
  } catch (err) {
    await server.close(0);
    demo.close();
    throw err;
  }
  const address = demo.address();
  const port = typeof address === 'object' && address ? address.port : 0;
  return {
    server,
    client,
    demoUrl: `http://127.0.0.1:${port}/`,
    async close() {
      await client.close();
      await server.close();
      demo.close();
    },
  };
}

function startDemoPage(): Promise<Server> {
  const server = createServer((req, res) => {
    const seenFrom = `${req.socket.remoteAddress}:${req.socket.remotePort}`;
    res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8' });
    res.end(
      `Hello from Digital-Shield VPN!\n` +
        `This page was fetched through the encrypted tunnel.\n` +
        `It saw your request come from ${seenFrom}: the dshield server's side of the tunnel, not your app.\n`,
    );
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve(server));
  });
}
