/**
 * A Tunnel for inbound-plugin tests with no session behind it: openStream
 * connects straight to a loopback target with net.connect, openUdp relays
 * through a local UDP socket. Names map to loopback addresses, and a few
 * reserved names make openStream fail the way the server would report it:
 *
 *   denied.test       EGRESS_DENIED
 *   refused.test      DESTINATION reason 'refused'
 *   unreachable.test  DESTINATION reason 'unreachable' (EHOSTUNREACH)
 *   netunreach.test   DESTINATION reason 'unreachable' (ENETUNREACH)
 *   nxdomain.test     DESTINATION reason 'dns'
 *   slow.test         DESTINATION reason 'timeout'
 *   down.test         TUNNEL_DOWN
 */
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { connect } from 'node:net';
import type { Duplex } from 'node:stream';
import { DshieldError, ErrorCodes } from '../../core/errors.ts';
import type { Target, Tunnel, TunnelUdp } from '../../core/types.ts';

export const SIMULATED_FAILURES: Record<string, () => DshieldError> = {
  'denied.test': () =>
    new DshieldError(ErrorCodes.EGRESS_DENIED, 'destination denied.test (10.0.0.1) is not allowed by the egress policy'),
  'refused.test': () =>
    new DshieldError(ErrorCodes.DESTINATION, 'refused.test:80 refused the connection', { detail: { reason: 'refused' } }),
  'unreachable.test': () =>
    new DshieldError(ErrorCodes.DESTINATION, 'unreachable.test:80 could not be reached', {
      detail: { reason: 'unreachable', errno: 'EHOSTUNREACH' },
    }),
  'netunreach.test': () =>
    new DshieldError(ErrorCodes.DESTINATION, 'netunreach.test:80 could not be reached', {
      detail: { reason: 'unreachable', errno: 'ENETUNREACH' },
    }),
  'nxdomain.test': () =>
    new DshieldError(ErrorCodes.DESTINATION, 'nxdomain.test:80 could not be resolved', { detail: { reason: 'dns' } }),
  'slow.test': () =>
    new DshieldError(ErrorCodes.DESTINATION, 'slow.test:80 did not answer in time', { detail: { reason: 'timeout' } }),
  'down.test': () => new DshieldError(ErrorCodes.TUNNEL_DOWN, 'the tunnel is down'),
};

export interface FakeTunnel extends Tunnel {
  /** Every target openStream was asked for, in order. */
  readonly opened: Target[];
  /** Every UDP target send was asked for, in order. */
  readonly udpSent: Target[];
  /** UDP associations opened and how many are closed. */
  readonly udpStats: { opened: number; closed: number };
  /** Destroys every stream and UDP socket it made. */
  close(): void;
}

/** `names` maps host names to the loopback address they stand for (default: origin.test -> 127.0.0.1). */
export function fakeTunnel(names: Record<string, string> = { 'origin.test': '127.0.0.1' }): FakeTunnel {
  const opened: Target[] = [];
  const udpSent: Target[] = [];
  const udpStats = { opened: 0, closed: 0 };
  const streams = new Set<Duplex>();
  const udpSockets = new Set<UdpSocket>();
  const resolveName = (host: string) => names[host] ?? host;

  return {
    opened,
    udpSent,
    udpStats,
    openStream(target) {
      opened.push({ ...target });
      const failure = SIMULATED_FAILURES[target.host];
      if (failure) return Promise.reject(failure());
      return new Promise((resolve, reject) => {
        const socket = connect({ host: resolveName(target.host), port: target.port });
        streams.add(socket);
        socket.once('close', () => streams.delete(socket));
        socket.once('connect', () => {
          socket.removeListener('error', onError);
          resolve(socket);
        });
        const onError = (err: NodeJS.ErrnoException) =>
          reject(
            new DshieldError(ErrorCodes.DESTINATION, `${target.host}:${target.port} failed: ${err.code}`, {
              detail: { reason: err.code === 'ECONNREFUSED' ? 'refused' : 'unreachable', errno: err.code },
            }),
          );
        socket.once('error', onError);
      });
    },
    openUdp(): TunnelUdp {
      udpStats.opened++;
      const socket = createSocket('udp4');
      udpSockets.add(socket);
      let handler: ((from: Target, payload: Buffer) => void) | undefined;
      let closed = false;
      socket.on('error', () => {});
      socket.on('message', (msg, rinfo) => handler?.({ host: rinfo.address, port: rinfo.port }, msg));
      return {
        send(target, payload) {
          if (closed) return;
          udpSent.push({ ...target });
          socket.send(payload, target.port, resolveName(target.host));
        },
        onMessage(h) {
          handler = h;
        },
        close() {
          if (closed) return;
          closed = true;
          udpStats.closed++;
          udpSockets.delete(socket);
          socket.close();
        },
      };
    },
    close() {
      for (const s of streams) s.destroy();
      for (const s of udpSockets) s.close();
      udpSockets.clear();
    },
  };
}
