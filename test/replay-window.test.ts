/**
 * core/replay-window.ts (RFC 6479): duplicates refused, reordering inside
 * the window accepted, older than the window refused, and the bitmap ring
 * wrapping around many times without forgetting or inventing counters.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ReplayWindow } from '../core/replay-window.ts';
import { startTsWorker } from '../core/tun/ts-worker.ts';
import { withTimeout } from './helpers/timeout.ts';

const SIZE = ReplayWindow.SIZE;

test('the window is at least 2048 counters wide', () => {
  assert.ok(SIZE >= 2048, `window ${SIZE}`);
});

test('duplicates are refused, however they are interleaved', () => {
  const w = new ReplayWindow();
  assert.ok(w.accept(0), 'counter 0 is new');
  assert.not.ok(w.accept(0), 'counter 0 again');
  for (let c = 1; c <= 100; c++) assert.ok(w.accept(c));
  for (let c = 0; c <= 100; c++) assert.not.ok(w.accept(c), `duplicate ${c}`);
  assert.ok(w.accept(5000));
  assert.not.ok(w.accept(5000), 'the highest again');
  assert.ok(w.accept(4000));
  assert.not.ok(w.accept(4000), 'a late one again');
  assert.not.ok(w.check(4000), 'check agrees');
});

test('reordering inside the window is accepted, each counter once', () => {
  const w = new ReplayWindow();
  // Every counter of [0, 3000) exactly once, in a scrambled order (a permutation: 7919 is prime).
  const n = 3000;
  for (let i = 0; i < n; i++) {
    const c = (i * 7919) % n;
    assert.ok(w.check(c), `check ${c}`);
    assert.ok(w.accept(c), `reordered ${c}`);
  }
  assert.is(w.highestAccepted, n - 1);
  // The far end of the window still works: SIZE - 1 behind the highest.
  assert.ok(w.accept(10_000));
  assert.ok(w.accept(10_000 - (SIZE - 1)), 'the oldest counter the window keeps');
  assert.ok(w.accept(10_000 - 1000));
});

test('older than the window is refused, even if never seen', () => {
  const w = new ReplayWindow();
  assert.ok(w.accept(10_000));
  assert.not.ok(w.check(10_000 - SIZE), 'exactly SIZE behind');
  assert.not.ok(w.accept(10_000 - SIZE));
  assert.not.ok(w.accept(0));
  assert.not.ok(w.accept(10_000 - SIZE - 1));
  // A jump far ahead makes everything before the new window too old.
  assert.ok(w.accept(1_000_000));
  assert.not.ok(w.accept(10_001), 'new when the window was lower, too old now');
});

test('bad counters are refused: negative, fractional, at or above the limit', () => {
  const w = new ReplayWindow();
  for (const c of [-1, 0.5, NaN, Infinity, Number.MAX_SAFE_INTEGER]) assert.not.ok(w.accept(c), String(c));
  assert.not.ok(w.accept(100, 100), 'at the limit');
  assert.ok(w.accept(99, 100));
});

test('wraparound: the bitmap ring wraps many times and stays exact', () => {
  const w = new ReplayWindow();
  // Walk far beyond the ring (4096 bits) in steps that hit every word boundary,
  // accepting each counter and checking the ones that must and must not be remembered.
  let highest = 0;
  for (let c = 0; c < 50_000; c += 3) {
    assert.ok(w.accept(c), `fresh ${c}`);
    highest = c;
    if (c % 999 === 0) {
      assert.not.ok(w.accept(c), `dup ${c}`);
      if (c >= 300) assert.not.ok(w.accept(c - 300), `dup ${c - 300} inside the window`);
      if (c >= 301) assert.ok(w.accept(c - 301), `never-seen ${c - 301} inside the window`);
      if (c >= SIZE + 10) assert.not.ok(w.accept(c - SIZE - 10), 'too old');
    }
  }
  // After a jump of exactly one ring, the reused words were cleared: counters in the new window are fresh.
  const jump = highest + 4096;
  assert.ok(w.accept(jump));
  for (let c = jump - 1; c > jump - SIZE; c -= 37) assert.ok(w.accept(c), `fresh after a ring-sized jump: ${c}`);
  // Counters above 2^32 (the words' index wraps differently there) behave the same.
  const big = 2 ** 40 + 5;
  assert.ok(w.accept(big));
  assert.ok(w.accept(big - 1));
  assert.not.ok(w.accept(big - 1));
  assert.ok(w.accept(big + 33));
  assert.not.ok(w.accept(big));
  assert.not.ok(w.accept(big - SIZE - 40), 'too old above 2^32');
});


test('a shared window keeps what was accepted before it was shared, in every view', () => {
  const w = new ReplayWindow();
  for (const c of [1, 2, 3, 900]) assert.ok(w.accept(c));
  const other = ReplayWindow.attach(w.share());
  assert.is(w.share(), w.share(), 'shared once: the same memory every time');
  for (const c of [1, 2, 3, 900]) assert.not.ok(other.accept(c), `counter ${c} was accepted before sharing`);
  assert.ok(other.accept(901), 'new in the other view');
  assert.not.ok(w.accept(901), 'and then refused in the first');
  assert.ok(w.accept(5000));
  assert.is(other.highestAccepted, 5000);
  assert.not.ok(other.check(5000 - SIZE), 'too old, in the other view too, once the window moved');
  assert.ok(other.check(5000 - SIZE + 1), 'the oldest still inside');
  assert.throws(() => ReplayWindow.attach(new SharedArrayBuffer(16)), /not a shared ReplayWindow/);
});

test('two threads offering the same counters to a shared window accept each exactly once', async () => {
  const w = new ReplayWindow();
  const buffer = w.share();
  const start = new SharedArrayBuffer(4);
  const count = 20_000;
  // The worker offers every counter the main thread offers too, at the same time.
  const worker = startTsWorker(new URL('./fixtures/replay-window-worker.ts', import.meta.url), { workerData: { buffer, from: 0, to: count, start } });
  try {
    const theirs = new Promise<number[]>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await new Promise((r) => setTimeout(r, 300)); // let it load and wait on `start`
    Atomics.store(new Int32Array(start), 0, 1);
    Atomics.notify(new Int32Array(start), 0);
    const mine: number[] = [];
    for (let c = 0; c < count; c++) if (w.accept(c)) mine.push(c);
    const other = await withTimeout(theirs, 10_000, 'the worker\'s counters');
    const all = [...mine, ...other].sort((a, b) => a - b);
    assert.is(all.length, new Set(all).size, 'no counter accepted twice');
    // Counters too far behind the highest when one side got to them are refused by both: none accepted twice, none invented.
    for (const c of all) assert.ok(c >= 0 && c < count);
    assert.ok(all.length >= count - SIZE * 2, `most counters accepted by one side or the other (${all.length} of ${count})`);
  } finally {
    await worker.terminate();
  }
});

test('a thread that finds a shared window locked long sleeps, marks the lock, and goes on once it is released', async () => {
  // White box: the lock is the window's first Int32 (0 free, 1 held, 2 held with a sleeper).
  const w = new ReplayWindow();
  const buffer = w.share();
  const lockWord = new Int32Array(buffer, 0, 1);
  Atomics.store(lockWord, 0, 1); // held, as by a thread descheduled inside accept()
  const start = new Int32Array(new SharedArrayBuffer(4), 0, 1);
  Atomics.store(start, 0, 1);
  const worker = startTsWorker(new URL('./fixtures/replay-window-worker.ts', import.meta.url), { workerData: { buffer, from: 5, to: 6, start: start.buffer } });
  try {
    const theirs = new Promise<number[]>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    const deadline = Date.now() + 10_000;
    while (Atomics.load(lockWord, 0) !== 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    assert.is(Atomics.load(lockWord, 0), 2, 'the waiting thread marked the lock: its release must wake it');
    assert.ok(w.check(5), 'nothing accepted while the lock is held');
    // Released as accept() releases it: free, then a wake for the sleeper.
    if (Atomics.exchange(lockWord, 0, 0) === 2) Atomics.notify(lockWord, 0, 1);
    assert.equal(await withTimeout(theirs, 10_000, "the worker's accept"), [5]);
    assert.not.ok(w.check(5), 'accepted once the lock was free');
    assert.is(Atomics.load(lockWord, 0), 0, 'and the lock is left free');
  } finally {
    await worker.terminate();
  }
});

test.run();
