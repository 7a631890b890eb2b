/**
 * SOCKS5 UDP ASSOCIATE end to end: a datagram sent to the client's relay
 * crosses the tunnel, leaves from the server, reaches a real UDP echo server
 * on loopback, and the echo comes back with the SOCKS UDP header. Over every
 * transport: tcp, ws, and udp (where CONNECT is answered "command not
 * supported" and client.http must be off, or the client stops at start-up).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import type { AddressInfo } from 'node:net';
import { runCli, stopAll } from './helpers/cli.ts';
import { RawSocket } from './helpers/raw-socket.ts';
import { startServerProc, startTunnel } from './helpers/tunnel.ts';
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

for (const transport of ['tcp', 'ws', 'udp']) {
  test(`${transport}: UDP ASSOCIATE relays datagrams through the tunnel both ways`, async () => {
    const t = await startTunnel(transport === 'udp' ? { transport, http: false } : { transport });
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

      if (transport === 'udp') {
        // Streams cannot ride datagrams: SOCKS5 CONNECT gets reply 0x07 (command not supported).
        const connect = await RawSocket.open(Number(t.socks.split(':')[1]));
        try {
          connect.write([5, 1, 0]);
          assert.equal([...(await connect.read(2))], [5, 0]);
          connect.write([5, 1, 0, 1, 127, 0, 0, 1, echoPort >> 8, echoPort & 255]);
          const refused = await connect.read(10);
          assert.is(refused[1], 0x07, 'CONNECT over transport udp: command not supported');
        } finally {
          connect.destroy();
        }
        assert.match(t.server.output(), /session up/i);
      }
    } finally {
      control?.destroy();
      udp.close();
      await t.close();
    }
  });
}

test('udp: a client with client.http on stops at start-up with one line and exit code 2', async () => {
  // The server run creates the key files the client's config names; then it is stopped.
  const s = await startServerProc({ transport: 'udp' });
  try {
    await s.server.stop();
    const { code, stdout, stderr } = await runCli(
      ['--mode', 'client', '--config', s.config, '--set', `client.server=${JSON.stringify(s.serverAddress)}`],
      { timeoutMs: 20_000 },
    );
    assert.is(code, 2, `exit code; output:\n${stdout}${stderr}`);
    const lines = stderr.trim().split('\n');
    assert.is(lines.length, 1, `one line: ${stderr}`);
    assert.match(
      lines[0]!,
      'DSHIELD_ERR_UNSUPPORTED: client.http needs a stream transport (tcp or ws); with transport udp set client.http to false',
    );
  } finally {
    s.cleanup();
  }
});

test.run();
