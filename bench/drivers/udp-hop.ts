/**
 * Relay-hop driver (bench/hop-floor.ts), two roles:
 *
 *   node --import tsx bench/drivers/udp-hop.ts echo  PORT
 *   node --import tsx bench/drivers/udp-hop.ts probe HOST PORT COUNT INTERVAL_MS LOCAL_PORT
 *
 * echo:  node:dgram, each datagram sent straight back: the least work a Node
 *        relay does per packet. Prints `READY` once bound.
 * probe: COUNT numbered datagrams of 84 bytes (a ping's IP payload plus header), one
 *        at a time, INTERVAL_MS after the previous answer, each waited for at
 *        most 1 s, from LOCAL_PORT (socat's UDP4-LISTEN answers only the
 *        address it first heard from, so every run must come from the same
 *        one). Prints `RESULT {json}`: answered, mean and median RTT (ms).
 */
import dgram from 'node:dgram';

const [role, ...args] = process.argv.slice(2);
const DATAGRAM = Buffer.alloc(84, 0x5a);
const ANSWER_TIMEOUT_MS = 1000;

if (role === 'echo') {
  const socket = dgram.createSocket('udp4');
  socket.on('message', (msg, from) => socket.send(msg, from.port, from.address));
  socket.bind(Number(args[0]), () => console.log('READY'));
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
  console.error('usage: udp-hop.ts echo PORT | probe HOST PORT COUNT INTERVAL_MS LOCAL_PORT');
  process.exit(2);
}
