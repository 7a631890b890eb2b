/**
 * A real HTTP server on loopback for end-to-end tests:
 *   GET  /download      the test's payload (its SHA-256 is known)
 *   ANY  /upload        reads the body, answers with its SHA-256 in hex
 *   GET  /slow          10 x 100 KiB over 2 s
 *   GET  /whoami        answers with the address the request came from and
 *                       `ss -p`'s line for it (which process owns that socket)
 *   GET  /<anything>    a short text page
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';

export const SLOW_CHUNK = 100 * 1024;

export interface WebServer {
  port: number;
  url(path: string): string;
  /** Source addresses of every request seen, in order. */
  seen: string[];
  close(): Promise<void>;
}

export function sha256(data: Buffer | string): string {
  return createHash('sha256').update(data).digest('hex');
}

export async function startWebServer(payload: Buffer, host = '127.0.0.1'): Promise<WebServer> {
  const seen: string[] = [];
  let port = 0;
  const server: Server = createServer((req, res) => {
    seen.push(`${req.socket.remoteAddress}`);
    const path = (req.url ?? '/').split('?')[0];
    if (path === '/download') {
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': payload.length });
      res.end(payload);
    } else if (path === '/upload') {
      const hash = createHash('sha256');
      let bytes = 0;
      req.on('data', (c: Buffer) => {
        hash.update(c);
        bytes += c.length;
      });
      req.on('end', () => {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(`${hash.digest('hex')} ${bytes}`);
      });
    } else if (path === '/slow') {
      // 2 s of data in 10 pieces: a stream that is still open when a test stops something.
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': SLOW_CHUNK * 10 });
      let sent = 0;
      const timer = setInterval(() => {
        res.write(Buffer.alloc(SLOW_CHUNK, sent));
        if (++sent === 10) {
          clearInterval(timer);
          res.end();
        }
      }, 200);
      res.on('close', () => clearInterval(timer));
    } else if (path === '/whoami') {
      // Which process owns the other end of this connection (asked while it is still open)?
      const peerPort = req.socket.remotePort;
      execFile('ss', ['-tnpH', 'state', 'established', `( sport = :${peerPort} and dport = :${port} )`], (_err, stdout) => {
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.end(`${req.socket.remoteAddress}:${peerPort}\n${stdout}`);
      });
    } else {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end('hello through the tunnel\n');
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, host, () => resolve());
  });
  port = (server.address() as AddressInfo).port;
  return {
    port,
    url: (path) => `http://${host.includes(':') ? `[${host}]` : host}:${port}${path}`,
    seen,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
