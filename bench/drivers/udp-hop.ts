/**
 * Relay-hop driver (bench/hop-floor.ts), four roles:
 *
 *   node --import tsx bench/drivers/udp-hop.ts echo  PORT
 *   node --import tsx bench/drivers/udp-hop.ts loop  PORT
 *   node --import tsx bench/drivers/udp-hop.ts uring PORT
 *   node --import tsx bench/drivers/udp-hop.ts probe HOST PORT COUNT INTERVAL_MS LOCAL_PORT
 *
 * echo:  node:dgram, each datagram sent straight back: the least work a Node
 *        relay does per packet. Prints `READY` once bound.
 * loop:  the same echo without the event loop: once bound, the main thread
 *        blocks in poll(2) and answers with recvfrom(2) and sendto(2) through
 *        koffi, never returning to libuv: the least a Node process can do per
 *        packet at all. Ended by a signal.
 * uring: the loop's echo through io_uring (uring-echo.ts): two crossings into
 *        the kernel per datagram where the loop makes four. Prints `READY`,
 *        or `UNAVAILABLE reason` and exits where io_uring cannot be used.
 * probe: COUNT numbered datagrams of 84 bytes (a ping's IP payload plus header), one
 *        at a time, INTERVAL_MS after the previous answer, each waited for at
 *        most 1 s, from LOCAL_PORT (socat's UDP4-LISTEN answers only the
 *        address it first heard from, so every run must come from the same
 *        one). Prints `RESULT {json}`: answered, mean and median RTT (ms).
 */
import dgram from 'node:dgram';
import { createRequire } from 'node:module';
import { dgramFd } from '../../core/udp-io.ts';
import { uringEcho, uringUnavailable } from './uring-echo.ts';

const [role, ...args] = process.argv.slice(2);
const DATAGRAM = Buffer.alloc(84, 0x5a);
const ANSWER_TIMEOUT_MS = 1000;

if (role === 'echo') {
  const socket = dgram.createSocket('udp4');
  socket.on('message', (msg, from) => socket.send(msg, from.port, from.address));
  socket.bind(Number(args[0]), () => console.log('READY'));
} else if (role === 'loop') {
  const socket = dgram.createSocket('udp4');
  socket.bind(Number(args[0]), () => {
    const fd = dgramFd(socket);
    if (fd === undefined) throw new Error("this Node does not show a dgram socket's fd");
    console.log('READY');
    echoWithoutEventLoop(fd);
  });
} else if (role === 'uring') {
  const socket = dgram.createSocket('udp4');
  socket.bind(Number(args[0]), () => {
    const fd = dgramFd(socket);
    const why = fd === undefined ? "this Node does not show a dgram socket's fd" : uringUnavailable();
    try {
      if (why !== null) throw new Error(why);
      uringEcho(fd!, () => console.log('READY'));
    } catch (err) {
      console.log(`UNAVAILABLE ${(err as Error).message}`);
      process.exit(0);
    }
  });
} else if (role === 'probe') {
  const [host, portText, countText, intervalText, localPortText] = args;
  const port = Number(portText);
  const count = Number(countText);
  const interval = Number(intervalText);
  const socket = dgram.createSocket('udp4');
  const rtts: number[] = [];
  let sentAt = 0n;
  let answered: (() => void) | undefined;
  let seq = 0;
  socket.on('message', (msg) => {
    // A late answer to a probe already given up on carries an older number.
    if (answered === undefined || msg.length < 4 || msg.readUInt32BE(0) !== seq) return;
    rtts.push(Number(process.hrtime.bigint() - sentAt) / 1e6);
    answered();
  });
  await new Promise<void>((resolve) => socket.bind(Number(localPortText), resolve));
  for (let i = 0; i < count; i++) {
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => done(), ANSWER_TIMEOUT_MS);
      const done = () => {
        clearTimeout(timer);
        answered = undefined;
        resolve();
      };
      answered = done;
      seq = i;
      DATAGRAM.writeUInt32BE(seq, 0);
      sentAt = process.hrtime.bigint();
      socket.send(DATAGRAM, port, host);
    });
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
  socket.close();
  const sorted = [...rtts].sort((a, b) => a - b);
  const mean = sorted.reduce((a, b) => a + b, 0) / Math.max(1, sorted.length);
  console.log(`RESULT ${JSON.stringify({ answered: sorted.length, count, mean, median: sorted[sorted.length >> 1] ?? NaN })}`);
} else {
  console.error('usage: udp-hop.ts echo PORT | loop PORT | uring PORT | probe HOST PORT COUNT INTERVAL_MS LOCAL_PORT');
  process.exit(2);
}

/** poll, then recvfrom and sendto until the socket is empty, forever; the fd is dgram's (non-blocking). */
function echoWithoutEventLoop(fd: number): never {
  const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  const lib = koffi.load('libc.so.6');
  const poll = lib.func('int poll(void *fds, unsigned long nfds, int timeout)');
  const recvfrom = lib.func('long recvfrom(int fd, void *buf, unsigned long len, int flags, void *addr, void *addrlen)');
  const sendto = lib.func('long sendto(int fd, const void *buf, unsigned long len, int flags, const void *addr, unsigned int addrlen)');
  const pollfd = Buffer.alloc(8);
  pollfd.writeInt32LE(fd, 0);
  pollfd.writeInt16LE(1, 4); // POLLIN
  const buf = Buffer.alloc(2048);
  const from = Buffer.alloc(16);
  const fromLength = new Uint32Array(1);
  for (;;) {
    poll(pollfd, 1, -1);
    for (;;) {
      fromLength[0] = from.length;
      const n = Number(recvfrom(fd, buf, buf.length, 0x40 /* MSG_DONTWAIT */, from, fromLength));
      if (n < 0) break;
      sendto(fd, buf, n, 0x40, from, fromLength[0]!);
    }
  }
}
