/**
 * The client's "dial" for a datagram transport: resolve the server's name
 * once (the data path never waits for DNS), then bind a fresh endpoint of
 * the same address family on any port. The session that runs over it
 * (core/session-datagram.ts) owns the endpoint from then on.
 */
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { DshieldError, ErrorCodes } from './errors.ts';
import { formatHostPort, parseHostPort } from './hostport.ts';
import type { DatagramEndpoint, DatagramTransportPlugin } from './types.ts';

export interface BoundForServer {
  endpoint: DatagramEndpoint;
  /** The server as a numeric "ip:port" ("[ipv6]:port"). */
  server: string;
}

/**
 * Rejects with DshieldError CONFIG (malformed address), UNREACHABLE
 * (detail.reason 'dns': the name does not resolve) or LISTEN (no local
 * socket could be bound), or the signal's reason when it is aborted.
 */
export async function bindForServer(transport: DatagramTransportPlugin, address: string, signal?: AbortSignal): Promise<BoundForServer> {
  const { host, port } = parseHostPort(address, 'server address');
  const shown = formatHostPort(host, port);
  if (port === 0) {
    throw new DshieldError(ErrorCodes.CONFIG, `server address: ${shown} has port 0; use the port the server listens on`);
  }
  let ip = host;
  if (isIP(host) === 0) {
    try {
      ip = (await lookup(host)).address;
    } catch (err) {
      throw new DshieldError(ErrorCodes.UNREACHABLE, `cannot reach the server at ${shown}: cannot resolve the name ${host}`, {
        cause: err,
        detail: { reason: 'dns', address: shown },
      });
    }
  }
  signal?.throwIfAborted();
  const endpoint = await transport.bind(isIP(ip) === 6 ? '[::]:0' : '0.0.0.0:0');
  if (signal?.aborted) {
    endpoint.close();
    signal.throwIfAborted();
  }
  return { endpoint, server: formatHostPort(ip, port) };
}
