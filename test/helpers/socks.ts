/**
 * A minimal raw SOCKS5 client for tests that need the reply code itself
 * (curl only reports a failure, not which one).
 */
import { connect, type Socket } from 'node:net';

/** Sends a CONNECT to host:port through the proxy; resolves with the reply code (0 = success) and the socket. */
export function socksConnect(
  proxyPort: number,
  host: string,
  port: number,
  timeoutMs = 10_000,
): Promise<{ reply: number; socket: Socket }> {
  return new Promise((resolve, reject) => {
    const socket = connect(proxyPort, '127.0.0.1');
    let buf = Buffer.alloc(0);
    let stage: 'method' | 'reply' = 'method';
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no SOCKS5 reply within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    socket.on('connect', () => socket.write(Buffer.from([5, 1, 0])));
    socket.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      if (stage === 'method' && buf.length >= 2) {
        buf = buf.subarray(2);
        stage = 'reply';
        const name = Buffer.from(host);
        socket.write(Buffer.concat([Buffer.from([5, 1, 0, 3, name.length]), name, Buffer.from([port >> 8, port & 255])]));
      }
      if (stage === 'reply' && buf.length >= 2) {
        clearTimeout(timer);
        socket.removeAllListeners('data');
        resolve({ reply: buf[1]!, socket });
      }
    });
  });
}
