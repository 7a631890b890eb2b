/**
 * The bench's io_uring echo (bench/drivers/uring-echo.ts, the relay-hop
 * floor's fourth echo): every datagram comes back unchanged to its sender,
 * an empty one is not answered and does not stop it, and where io_uring
 * cannot be used it says why instead of taking a bench row down.
 * Traffic: 127.0.0.1 only.
 */
import { spawn } from 'node:child_process';
import dgram from 'node:dgram';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ROOT } from './helpers/cli.ts';
import { ProcessOutput } from './helpers/output.ts';
import { withTimeout } from './helpers/timeout.ts';

const DRIVER = join(ROOT, 'bench', 'drivers', 'udp-hop.ts');
const TSX = import.meta.resolve('tsx');

/** Whether this kernel lets the echo use io_uring: Linux, an architecture it lays out, io_uring_disabled 0. */
function uringAllowed(): boolean {
  if (process.platform !== 'linux' || (process.arch !== 'x64' && process.arch !== 'arm64')) return false;
  try {
    return readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim() === '0';
  } catch {
    return true; // kernels before 6.6 have no switch: io_uring is on
  }
}

/** A UDP port on 127.0.0.1 that was free a moment ago. */
async function freePort(): Promise<number> {
  const s = dgram.createSocket('udp4');
  await new Promise<void>((resolve) => s.bind(0, '127.0.0.1', resolve));
  const port = s.address().port;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

test('the io_uring echo answers each datagram with the same bytes, skips an empty one, or says why it cannot run', async () => {
  const port = await freePort();
  const child = spawn(process.execPath, ['--import', TSX, DRIVER, 'uring', String(port)], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  const out = new ProcessOutput('uring echo');
  child.stdout.on('data', (c: Buffer) => out.append(c.toString()));
  child.stderr.on('data', (c: Buffer) => out.append(c.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => (out.ended(String(code)), resolve(code))));
  const socket = dgram.createSocket('udp4');
  try {
    const said = await out.waitFor(/^(READY|UNAVAILABLE (.+))$/m, 30_000);
    if (!uringAllowed()) {
      assert.ok(said[2], `expected the echo to say why io_uring cannot be used here; it said ${said[0]}`);
      assert.is(await withTimeout(exited, 10_000, 'the echo to exit'), 0);
      return;
    }
    assert.is(said[1], 'READY', `io_uring is allowed here, but the echo said: ${said[0]}`);
    await new Promise<void>((resolve) => socket.bind(0, '127.0.0.1', resolve));
    const answers: Buffer[] = [];
    let arrived: (() => void) | undefined;
    socket.on('message', (msg) => (answers.push(msg), arrived?.()));
    const echo = async (datagram: Buffer): Promise<Buffer> => {
      const got = new Promise<void>((resolve) => (arrived = resolve));
      socket.send(datagram, port, '127.0.0.1');
      await withTimeout(got, 5_000, `the echo of a ${datagram.length}-byte datagram`);
      return answers.shift()!;
    };
    for (const size of [84, 1, 1400, 2048]) {
      const datagram = Buffer.alloc(size);
      for (let i = 0; i < size; i++) datagram[i] = (i * 7 + size) & 0xff;
      assert.equal(await echo(datagram), datagram, `${size} bytes came back changed`);
    }
    socket.send(Buffer.alloc(0), port, '127.0.0.1');
    const after = Buffer.from('after an empty datagram');
    assert.equal(await echo(after), after);
    assert.is(answers.length, 0, 'the empty datagram was answered');
  } finally {
    socket.close();
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    await withTimeout(exited, 10_000, 'the echo to end');
  }
});

test.run();
