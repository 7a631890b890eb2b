/**
 * Early opens, end to end (real CLI, loopback): a new connection's first
 * bytes follow the stream's OPEN through the tunnel without waiting for the
 * server's OPEN_OK, so a connection costs one round trip to the server less.
 *
 * How it is seen without timing anything: the client reaches the server
 * through a relay that can hold everything the server sends. While it holds,
 * no OPEN_OK can reach the client; an early open still answers the app and
 * its request still reaches the destination, and the answer comes once the
 * relay lets the server's bytes through. An open that waits for OPEN_OK
 * (SOCKS5 with earlyReply: false) answers only then.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { connect, createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { stopAll } from './helpers/cli.ts';
import { socksConnect } from './helpers/socks.ts';
import { startTunnel, type TunnelProcs } from './helpers/tunnel.ts';
import { withTimeout } from './helpers/timeout.ts';
import { startWebServer, type WebServer } from './helpers/web.ts';

/** A TCP relay to `target` that passes client -> server bytes always and server -> client bytes unless held. */
interface GateRelay {
  port: number;
  hold(): void;
  /** Passes on, in order, what was held, and everything from then on. */
  release(): void;
  close(): Promise<void>;
}

async function startGateRelay(target: { host: string; port: number }): Promise<GateRelay> {
  const sockets = new Set<Socket>();
  const toClient: Array<() => void> = [];
  let held = false;
  const server: Server = createServer((down) => {
    const up = connect(target.port, target.host);
    sockets.add(down).add(up);
    down.pipe(up);
    up.on('data', (chunk: Buffer) => {
      if (held) toClient.push(() => down.write(chunk));
      else down.write(chunk);
    });
    const end = (): void => {
      down.destroy();
      up.destroy();
    };
    down.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    port: (server.address() as AddressInfo).port,
    hold: () => void (held = true),
    release: () => {
      held = false;
      for (const pass of toClient.splice(0)) pass();
    },
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

let web: WebServer;
let relay: GateRelay | undefined;
let tunnel: TunnelProcs | undefined;

async function tunnelThroughGate(clientArgs: string[] = []): Promise<{ t: TunnelProcs; gate: GateRelay }> {
  const t = await startTunnel({
    clientArgs,
    via: async (address) => {
      const colon = address.lastIndexOf(':');
      relay = await startGateRelay({ host: address.slice(0, colon), port: Number(address.slice(colon + 1)) });
      return `127.0.0.1:${relay.port}`;
    },
  });
  tunnel = t;
  return { t, gate: relay! };
}

/**
 * Every byte `socket` receives until `done(received)` says it is enough;
 * rejects after `ms`. Made before the step that should produce it, so it is
 * marked handled: a test that fails first must not leave it to crash the file.
 */
function readUntil(socket: Socket, done: (text: string) => boolean, ms: number, what: string): Promise<string> {
  let text = '';
  const reading = withTimeout(
    new Promise<string>((resolve, reject) => {
      const onData = (c: Buffer): void => {
        text += c.toString('latin1');
        if (!done(text)) return;
        socket.off('data', onData);
        resolve(text);
      };
      socket.on('data', onData);
      socket.once('close', () => reject(new Error(`${what}: the connection closed after ${JSON.stringify(text)}`)));
    }),
    ms,
    what,
  );
  reading.catch(() => {});
  return reading;
}

/** Resolves once the web server has seen `count` requests; fails after ms. */
async function seenRequests(count: number, ms: number, what: string): Promise<void> {
  const deadline = Date.now() + ms;
  while (web.seen.length < count) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const GET_HELLO = 'GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n';
const HELLO = /hello through the tunnel/;

test.before(async () => {
  web = await startWebServer(Buffer.alloc(0));
});

test.after.each(async () => {
  await tunnel?.close();
  await relay?.close();
  tunnel = undefined;
  relay = undefined;
});

test.after(async () => {
  await stopAll();
  await web?.close();
});

test('SOCKS5 (earlyReply, the default): the reply and the request go while the server cannot answer yet', async () => {
  const { t, gate } = await tunnelThroughGate();
  gate.hold();
  const before = web.seen.length;
  const { reply, socket } = await socksConnect(Number(t.socks.split(':')[1]), '127.0.0.1', web.port, 5000);
  try {
    assert.is(reply, 0x00, 'answered with nothing from the server');
    const answer = readUntil(socket, (text) => HELLO.test(text), 5000, 'the answer once the relay passes it');
    socket.write(GET_HELLO);
    await seenRequests(before + 1, 5000, 'the request at the destination, behind the OPEN');
    gate.release();
    assert.match(await answer, HELLO);
  } finally {
    socket.destroy();
  }
});

test('SOCKS5 with earlyReply false: the reply waits for the server', async () => {
  const { t, gate } = await tunnelThroughGate(['--set', `client.socks=${JSON.stringify({ listen: '127.0.0.1:0', earlyReply: false })}`]);
  gate.hold();
  const replied = socksConnect(Number(t.socks.split(':')[1]), '127.0.0.1', web.port, 5000);
  const first = await Promise.race([replied.then(() => 'reply'), new Promise((r) => setTimeout(() => r('none yet'), 300))]);
  assert.is(first, 'none yet', 'no reply while the server cannot answer');
  gate.release();
  const { reply, socket } = await replied;
  try {
    assert.is(reply, 0x00);
    const answer = readUntil(socket, (text) => HELLO.test(text), 5000, 'the answer');
    socket.write(GET_HELLO);
    assert.match(await answer, HELLO);
  } finally {
    socket.destroy();
  }
});

test('HTTP proxy: CONNECT (earlyReply) and a plain request both reach the destination while the server cannot answer yet', async () => {
  const { t, gate } = await tunnelThroughGate();
  const proxyPort = Number(new URL(t.http).port);
  gate.hold();
  const before = web.seen.length;

  const viaConnect = connect(proxyPort, '127.0.0.1');
  const plain = connect(proxyPort, '127.0.0.1');
  try {
    const established = readUntil(viaConnect, (text) => text.includes('\r\n\r\n'), 5000, 'the CONNECT answer');
    viaConnect.write(`CONNECT 127.0.0.1:${web.port} HTTP/1.1\r\nHost: 127.0.0.1:${web.port}\r\n\r\n`);
    assert.match(await established, /^HTTP\/1\.1 200 /, 'answered with nothing from the server');
    const tunneled = readUntil(viaConnect, (text) => HELLO.test(text), 5000, 'the answer inside CONNECT');
    viaConnect.write(GET_HELLO);

    const proxied = readUntil(plain, (text) => HELLO.test(text), 5000, 'the plain request answer');
    plain.write(`GET http://127.0.0.1:${web.port}/hello HTTP/1.1\r\nHost: 127.0.0.1:${web.port}\r\nConnection: close\r\n\r\n`);

    await seenRequests(before + 2, 5000, 'both requests at the destination, behind their OPENs');
    gate.release();
    assert.match(await tunneled, HELLO);
    assert.match(await proxied, /^HTTP\/1\.1 200 [\s\S]*hello through the tunnel/);
  } finally {
    viaConnect.destroy();
    plain.destroy();
  }
});

test('HTTP proxy: a plain request refused by the server still gets its 403, though it was sent early', async () => {
  const t = await startTunnel({ allow: [] });
  tunnel = t;
  const res = await withTimeout(fetchThroughProxy(Number(new URL(t.http).port), `http://127.0.0.1:${web.port}/hello`), 5000, 'the answer');
  assert.match(res, /^HTTP\/1\.1 403 /);
  assert.match(res, /egress policy/);
});

/** A plain GET through the HTTP proxy on `port`; resolves with the whole answer once the proxy closes. */
function fetchThroughProxy(port: number, url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    let text = '';
    socket.on('data', (c: Buffer) => (text += c.toString('latin1')));
    socket.on('error', reject);
    socket.on('close', () => resolve(text));
    socket.write(`GET ${url} HTTP/1.1\r\nHost: ${new URL(url).host}\r\nConnection: close\r\n\r\n`);
  });
}

test.run();
