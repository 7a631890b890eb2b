/**
 * A 1 GiB download to a reader that barely reads: flow control must slow the
 * sender down end to end, so neither the server nor the client process
 * buffers what the reader has not taken. Measured from outside: the bytes
 * the destination managed to send vs. the bytes the reader took, and the
 * resident memory of both dshield processes.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { stopAll } from './helpers/cli.ts';
import { socksConnect } from './helpers/socks.ts';
import { startTunnel } from './helpers/tunnel.ts';

const GIB = 1024 ** 3;
const MIB = 1024 ** 2;
const WATCH_MS = 6000;
const READ_PER_TURN = 512 * 1024;

function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0);
  return kb * 1024;
}

let sentByDestination = 0;
let destination: Server;

test.before(async () => {
  const chunk = Buffer.alloc(64 * 1024, 0x5a);
  destination = createServer((_req, res) => {
    res.writeHead(200, { 'content-length': GIB });
    const pump = () => {
      while (sentByDestination < GIB) {
        sentByDestination += chunk.length;
        if (!res.write(chunk)) return void res.once('drain', pump);
      }
      res.end();
    };
    res.on('close', () => res.removeAllListeners('drain'));
    pump();
  });
  await new Promise<void>((r) => destination.listen(0, '127.0.0.1', () => r()));
});

test.after(async () => {
  await stopAll();
  destination.closeAllConnections();
  destination.close();
});

for (const transport of ['tcp', 'ws']) {
  test(`${transport}: a slow reader slows the sender; memory stays bounded on both sides`, async () => {
    sentByDestination = 0;
    const t = await startTunnel({ transport });
    try {
      const pids = [t.server.child.pid!, t.client.child.pid!];
      const baseline = pids.map(rssBytes);
      const port = (destination.address() as AddressInfo).port;
      const { reply, socket } = await socksConnect(Number(t.socks.split(':')[1]), '127.0.0.1', port);
      assert.is(reply, 0);
      // Read a little now and then: 512 KiB every 250 ms (2 MiB/s), where loopback could carry GiB/s.
      // A budget, not a reading time: in 10 ms of reading a fast machine drains tens of MiB of buffers.
      let read = 0;
      let budget = 0;
      socket.on('data', (c: Buffer) => {
        read += c.length;
        if (read >= budget) socket.pause();
      });
      socket.write(`GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`);
      socket.pause();
      const peak = [...baseline];
      const started = Date.now();
      while (Date.now() - started < WATCH_MS) {
        budget += READ_PER_TURN;
        socket.resume();
        await new Promise((r) => setTimeout(r, 250));
        pids.forEach((pid, i) => (peak[i] = Math.max(peak[i]!, rssBytes(pid))));
      }
      socket.destroy();

      const inFlight = sentByDestination - read;
      const growth = peak.map((p, i) => p - baseline[i]!);
      console.log(
        `  ${transport}: destination sent ${(sentByDestination / MIB).toFixed(1)} MiB, reader took ${(read / MIB).toFixed(1)} MiB, ` +
          `rss growth server ${(growth[0]! / MIB).toFixed(1)} MiB, client ${(growth[1]! / MIB).toFixed(1)} MiB`,
      );
      assert.ok(read > 0, 'the reader got data');
      assert.ok(sentByDestination < GIB / 4, `the destination was slowed down (sent ${sentByDestination} bytes)`);
      // Kernel socket buffers on three loopback hops plus the stream window: tens of MiB at most.
      assert.ok(inFlight < 64 * MIB, `bytes sent but not read: ${(inFlight / MIB).toFixed(1)} MiB`);
      assert.ok(growth[0]! < 64 * MIB, `server memory grew by ${(growth[0]! / MIB).toFixed(1)} MiB`);
      assert.ok(growth[1]! < 64 * MIB, `client memory grew by ${(growth[1]! / MIB).toFixed(1)} MiB`);
    } finally {
      await t.close();
    }
  });
}

test.run();
