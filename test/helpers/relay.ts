/**
 * A TCP relay that sits between a client and a server and records every
 * byte that passes in each direction: the "man in the middle" of the tests.
 */
import { createServer, connect, type Server, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';

export interface Relay {
  port: number;
  /** Bytes client -> server, and server -> client, per accepted connection, in order. */
  toServer: Buffer[];
  toClient: Buffer[];
  total(): { toServer: number; toClient: number };
  close(): Promise<void>;
}

export async function startRelay(target: { host: string; port: number }): Promise<Relay> {
  const toServer: Buffer[] = [];
  const toClient: Buffer[] = [];
  const sockets = new Set<Socket>();
  const server: Server = createServer((downstream) => {
    const upstream = connect(target.port, target.host);
    sockets.add(downstream).add(upstream);
    downstream.on('data', (c: Buffer) => toServer.push(Buffer.from(c)));
    upstream.on('data', (c: Buffer) => toClient.push(Buffer.from(c)));
    downstream.pipe(upstream);
    upstream.pipe(downstream);
    const end = () => {
      downstream.destroy();
      upstream.destroy();
    };
    downstream.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const size = (list: Buffer[]) => list.reduce((n, b) => n + b.length, 0);
  return {
    port: (server.address() as AddressInfo).port,
    toServer,
    toClient,
    total: () => ({ toServer: size(toServer), toClient: size(toClient) }),
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
