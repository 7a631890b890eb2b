/**
 * core/splice.ts with in-memory streams: what one turn's chunks become at
 * the writable (one writev), backpressure at WRITE_AHEAD, half-close, and
 * destruction of both sides when one fails.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Duplex } from 'node:stream';
import { splice } from '../core/splice.ts';
import { withTimeout } from './helpers/timeout.ts';

/** A duplex whose readable side the test pushes into and whose writable side records every write call. */
class Probe extends Duplex {
  /** One entry per _write/_writev call: the sizes of the chunks it carried. */
  readonly calls: number[][] = [];
  /** Set: writes are not acknowledged until release() (a slow consumer). */
  hold = false;
  private held: Array<() => void> = [];

  constructor() {
    super({ allowHalfOpen: true });
  }

  override _read(): void {}

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.calls.push([chunk.length]);
    this.ack(cb);
  }

  override _writev(chunks: Array<{ chunk: Buffer }>, cb: (err?: Error | null) => void): void {
    this.calls.push(chunks.map((c) => c.chunk.length));
    this.ack(cb);
  }

  release(): void {
    this.hold = false;
    for (const cb of this.held.splice(0)) cb();
  }

  get bytesWritten(): number {
    return this.calls.flat().reduce((a, b) => a + b, 0);
  }

  private ack(cb: () => void): void {
    if (this.hold) this.held.push(cb);
    else process.nextTick(cb);
  }
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

test('chunks read in one turn reach the other side in one writev', async () => {
  const a = new Probe();
  const b = new Probe();
  void splice(a, b);
  await tick();
  for (let i = 0; i < 4; i++) a.push(Buffer.alloc(16 * 1024, i));
  await tick();
  assert.equal(b.calls, [[16384, 16384, 16384, 16384]], 'one call carrying the four chunks');
  a.push(Buffer.alloc(100));
  await tick();
  assert.equal(b.calls.at(-1), [100], 'a later turn is a later write');
  a.destroy();
});

test('the source pauses once 128 KiB wait and flows again on drain', async () => {
  const a = new Probe();
  const b = new Probe();
  void splice(a, b);
  await tick();
  b.hold = true;
  for (let i = 0; i < 20; i++) a.push(Buffer.alloc(16 * 1024));
  await tick();
  assert.ok(a.isPaused(), 'source paused while the writable holds its data');
  const waiting = b.writableLength;
  assert.ok(waiting >= 128 * 1024 && waiting < 128 * 1024 + 32 * 1024, `paused at the mark, not before or long after (${waiting} bytes)`);
  assert.ok(a.readableLength > 0, 'the rest waits in the source');
  b.release();
  await withTimeout(
    (async () => {
      while (b.bytesWritten < 20 * 16 * 1024) {
        b.release();
        await tick();
      }
    })(),
    2_000,
    'everything written after the drains',
  );
  assert.not.ok(a.isPaused(), 'flowing again');
  a.destroy();
});

test('an end is passed on as a half-close, and the other direction still flows', async () => {
  const a = new Probe();
  const b = new Probe();
  void splice(a, b);
  a.push(Buffer.from('request'));
  a.push(null);
  await withTimeout(new Promise((r) => b.once('finish', r)), 2_000, "b's writable finished");
  assert.is(b.bytesWritten, 7);
  assert.not.ok(a.destroyed || b.destroyed, 'nobody destroyed by a half-close');
  b.push(Buffer.from('response'));
  await tick();
  assert.is(a.bytesWritten, 8, 'the reply still reaches a');
  b.push(null);
  await withTimeout(new Promise((r) => a.once('finish', r)), 2_000, "a's writable finished");
  a.destroy();
  b.destroy();
});

test('an end is not passed on to a side whose writable has already ended', async () => {
  const a = new Probe();
  const b = new Probe();
  void splice(a, b);
  // As a socket without half-open does when its peer ends first.
  b.end();
  await withTimeout(new Promise((r) => b.once('finish', r)), 2_000, "b's writable finished");
  let ends = 0;
  const end = b.end.bind(b);
  b.end = ((...args: Parameters<Probe['end']>) => {
    ends++;
    return end(...args);
  }) as Probe['end'];
  a.push(null);
  await withTimeout(new Promise((r) => a.once('end', r)), 2_000, "a's readable ended");
  await tick();
  assert.is(ends, 0, 'no end() on a writable already ended');
  a.destroy();
  b.destroy();
});

test('an error on one side destroys both, and splice resolves', async () => {
  const a = new Probe();
  const b = new Probe();
  const done = splice(a, b);
  a.push(Buffer.alloc(10));
  await tick();
  a.destroy(new Error('reset by peer'));
  await withTimeout(done, 2_000, 'splice resolves');
  assert.ok(b.destroyed, 'the other side is destroyed too');
});

test('a source paused by its owner (a handshake read) flows once spliced', async () => {
  const a = new Probe();
  const b = new Probe();
  a.pause();
  a.push(Buffer.from('early bytes'));
  void splice(a, b);
  await tick();
  assert.is(b.bytesWritten, 11);
  a.destroy();
});

test.run();
