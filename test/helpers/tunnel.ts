/**
 * Starts a dshield server process and a client process on loopback that
 * share one temp config dir (as the shipped config does on one machine):
 * the server creates its key and the client's on first run.
 */
import { startCli, tempDir, writeConfig, type Proc } from './cli.ts';

export interface TunnelProcs {
  server: Proc;
  client: Proc;
  /** "127.0.0.1:port" of the client's SOCKS5 proxy. */
  socks: string;
  /** "http://127.0.0.1:port" of the client's HTTP proxy ('' with `http: false`). */
  http: string;
  /** The server's transport address. */
  serverAddress: string;
  dir: string;
  config: string;
  close(): Promise<void>;
}

export interface TunnelOptions {
  transport?: string;
  cipher?: string;
  /** server.egress.allow; default ['127.0.0.0/8'] so tests can reach their loopback web server. */
  allow?: string[];
  /** Extra config merged at the top level. */
  extra?: Record<string, unknown>;
  /** Dial this instead of the server's address (a relay in the middle). */
  via?: (serverAddress: string) => Promise<string>;
  clientArgs?: string[];
  /** More arguments for the server's command line (--set ...). */
  serverArgs?: string[];
  /** false: no HTTP proxy (client.http: false), as a datagram transport requires. */
  http?: false;
}

export async function startServerProc(opts: TunnelOptions = {}): Promise<{ server: Proc; serverAddress: string; dir: string; config: string; cleanup(): void }> {
  const dir = tempDir();
  const config = writeConfig(dir.dir, {
    transport: opts.transport ?? 'tcp',
    cipher: opts.cipher ?? 'chacha20-poly1305',
    logging: [{ use: 'console', level: 'debug' }],
    ...opts.extra,
    server: {
      listen: '127.0.0.1:0',
      privateKey: 'keys/server.key',
      clients: [{ name: 'e2e', publicKey: 'keys/client.pub' }],
      egress: { allow: opts.allow ?? ['127.0.0.0/8'] },
      handshakeTimeout: 3000,
    },
    client: {
      privateKey: 'keys/client.key',
      serverPublicKey: 'keys/server.pub',
      socks: '127.0.0.1:0',
      http: opts.http === false ? false : '127.0.0.1:0',
      handshakeTimeout: 2500,
    },
  });
  const server = startCli(['--mode', 'server', '--config', config, ...(opts.serverArgs ?? [])]);
  const [, serverAddress] = await server.waitFor(/listening on (\S+)/);
  return { server, serverAddress: serverAddress!, dir: dir.dir, config, cleanup: dir.cleanup };
}

export function startClientProc(config: string, serverAddress: string, extraArgs: string[] = []): Proc {
  return startCli(['--mode', 'client', '--config', config, '--set', `client.server=${JSON.stringify(serverAddress)}`, ...extraArgs]);
}

export async function startTunnel(opts: TunnelOptions = {}): Promise<TunnelProcs> {
  const s = await startServerProc(opts);
  try {
    const dial = opts.via ? await opts.via(s.serverAddress) : s.serverAddress;
    const client = startClientProc(s.config, dial, opts.clientArgs);
    const [, socks] = await client.waitFor(/proxy ready: socks5:\/\/(\S+)/);
    const [, http] = opts.http === false ? [, ''] : await client.waitFor(/proxy ready: (http:\/\/\S+)/);
    return {
      server: s.server,
      client,
      socks: socks!,
      http: http!,
      serverAddress: s.serverAddress,
      dir: s.dir,
      config: s.config,
      async close() {
        await client.stop();
        await s.server.stop();
        s.cleanup();
      },
    };
  } catch (err) {
    await s.server.stop();
    s.cleanup();
    throw err;
  }
}
