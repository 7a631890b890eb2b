/**
 * The bench's "web" host, run inside the web namespace:
 *
 *   node --import tsx bench/web-host.ts IP HTTP_PORT IDLE_PORT ECHO_PORT
 *
 * - HTTP on IP:HTTP_PORT
 *     GET /1k?...        1 KiB body (the small request of every latency test)
 *     GET /bytes/N       N bytes, streamed from one reused 1 MiB chunk with
 *                        backpressure (a 1 GiB download never sits in memory)
 *     PUT|POST /upload   reads the body, answers with the byte count
 * - a TCP server on IDLE_PORT that accepts and holds connections silently
 *   (the idle streams of the scale test);
 * - a TCP server on ECHO_PORT that echoes everything (the active streams).
 *
 * Every HTTP request is logged on stdout as `HTTP <source> <method> <path>`:
 * the source address is the proof that a system's traffic went through its
 * server (the server namespace's address) and not around it. Prints READY
 * once listening; exits on SIGTERM/SIGINT.
 */
import { createServer } from 'node:http';
import { createServer as createTcpServer } from 'node:net';

const [ip, httpPort, idlePort, echoPort] = process.argv.slice(2);
if (!ip || !httpPort || !idlePort || !echoPort) {
  console.error('usage: web-host.ts IP HTTP_PORT IDLE_PORT ECHO_PORT');
  process.exit(2);
}

const KIB = Buffer.alloc(1024, 'k');
const CHUNK = Buffer.alloc(1024 * 1024, 'd');

const http = createServer((req, res) => {
  const path = (req.url ?? '/').split('?')[0]!;
  // Bulk paths are logged too, but only their first request per path matters to the reader.
  console.log(`HTTP ${req.socket.remoteAddress} ${req.method} ${req.url}`);
  if (path === '/upload') {
    let bytes = 0;
    req.on('data', (c: Buffer) => (bytes += c.length));
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.end(`${bytes}\n`);
    });
    return;
  }
  const bulk = /^\/bytes\/(\d+)$/.exec(path);
  if (bulk) {
    const total = Number(bulk[1]);
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': total });
    let left = total;
    const pump = () => {
      while (left > 0) {
        const piece = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
        left -= piece.length;
        if (!res.write(piece)) {
          res.once('drain', pump);
          return;
        }
      }
      res.end();
    };
    pump();
    return;
  }
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': KIB.length });
  res.end(KIB);
});
http.keepAliveTimeout = 60_000;

const idle = createTcpServer({ noDelay: true }, (socket) => {
  socket.on('error', () => socket.destroy());
});
const echo = createTcpServer({ noDelay: true }, (socket) => {
  socket.on('error', () => socket.destroy());
  socket.pipe(socket);
});
idle.maxConnections = 100_000;

let listening = 0;
const ready = () => {
  if (++listening === 3) console.log('READY');
};
http.listen(Number(httpPort), ip, ready);
idle.listen({ port: Number(idlePort), host: ip, backlog: 4096 }, ready);
echo.listen({ port: Number(echoPort), host: ip, backlog: 4096 }, ready);
for (const sig of ['SIGTERM', 'SIGINT'] as const) process.on(sig, () => process.exit(0));
