/**
 * SOCKS5 UDP ASSOCIATE end to end: a datagram sent to the client's relay
 * crosses the tunnel, leaves from the server, reaches a real UDP echo server
 * on loopback, and the echo comes back with the SOCKS UDP header.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import type { AddressInfo } from 'node:net';
import { stopAll } from './helpers/cli.ts';
import { RawSocket } from './helpers/raw-socket.ts';
import { startTunnel } from './helpers/tunnel.ts';
import { withTimeout } from './helpers/timeout.ts';

let echo: UdpSocket;
const echoedFrom: string[] = [];

test.before(async () => {
  echo = createSocket('udp4');
  echo.on('message', (msg, rinfo) => {
    echoedFrom.push(`${rinfo.address}:${rinfo.port}`);
    echo.send(msg, rinfo.port, rinfo.address);
  });
  await new Promise<void>((r) => echo.bind(0, '127.0.0.1', () => r()));
});

test.after(async () => {
  await stopAll();
  echo.close();
});

for (const transport of ['tcp', 'ws']) {
  test(`${transport}: UDP ASSOCIATE relays datagrams through the tunnel both ways`, async () => {
    const t = await startTunnel({ transport });
    const udp = createSocket('udp4');
    let control: RawSocket | undefined;
    try {
      control = await RawSocket.open(Number(t.socks.split(':')[1]));
      control.write([5, 1, 0]);
      assert.equal([...(await control.read(2))], [5, 0]);
      control.write([5, 3, 0, 1, 0, 0, 0, 0, 0, 0]); // UDP ASSOCIATE, client address not known yet
      const reply = await control.read(10);
      assert.is(reply[1], 0, 'UDP ASSOCIATE accepted');
      const relayPort = reply.readUInt16BE(8);
      await new Promise<void>((r) => udp.bind(0, '127.0.0.1', () => r()));

      const echoPort = (echo.address() as AddressInfo).port;
      const header = Buffer.from([0, 0, 0, 1, 127, 0, 0, 1, echoPort >> 8, echoPort & 255]);
      const answers: Buffer[] = [];
      udp.on('message', (msg) => answers.push(msg));
      for (let i = 0; i < 20 && answers.length < 3; i++) {
        udp.send(Buffer.concat([header, Buffer.from(`datagram ${i}`)]), relayPort, '127.0.0.1');
        await new Promise((r) => setTimeout(r, 100));
      }
      await withTimeout(
        (async () => {
          while (answers.length === 0) await new Promise((r) => setTimeout(r, 20));
        })(),
        5000,
        'an echoed datagram',
      );
      const first = answers[0]!;
      assert.equal([...first.subarray(0, 10)], [...header], 'the answer carries the SOCKS UDP header naming the echo server');
      assert.match(first.subarray(10).toString(), /^datagram \d+$/);
      assert.ok(echoedFrom.length > 0, 'the echo server saw the datagrams');
    } finally {
      control?.destroy();
      udp.close();
      await t.close();
    }
  });
}

test.run();
