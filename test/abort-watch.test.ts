/**
 * core/abort-watch.ts: a watch runs once when its signal aborts and never
 * after it ended; one listener per signal however many watch it; and what a
 * finished watch held dies young, where a listener added and removed on a
 * long-lived AbortSignal is promoted (why watchAbort exists).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { getEventListeners } from 'node:events';
import { watchAbort } from '../core/abort-watch.ts';
import { promotedByChurn } from './helpers/gc-churn.ts';

test('a watch runs once on abort; an ended one never does', () => {
  const ac = new AbortController();
  const ran: string[] = [];
  watchAbort(ac.signal, () => ran.push('a'));
  const endB = watchAbort(ac.signal, () => ran.push('b'));
  watchAbort(ac.signal, () => ran.push('c'));
  endB();
  ac.abort();
  ac.abort();
  assert.equal(ran.sort(), ['a', 'c']);
});

test('one listener on the signal, however many watch it', () => {
  const ac = new AbortController();
  const ends = Array.from({ length: 50 }, () => watchAbort(ac.signal, () => {}));
  assert.is(getEventListeners(ac.signal, 'abort').length, 1);
  for (const end of ends) end();
  watchAbort(ac.signal, () => {});
  assert.is(getEventListeners(ac.signal, 'abort').length, 1);
});

test('a watch ended by another during the abort does not run', () => {
  const ac = new AbortController();
  const ran: string[] = [];
  let endSecond = (): void => {};
  // Whichever runs first ends the other, as a stream settling another would.
  watchAbort(ac.signal, () => {
    ran.push('first');
    endSecond();
  });
  endSecond = watchAbort(ac.signal, () => {
    ran.push('second');
  });
  ac.abort();
  assert.is(ran.length, 1, `ran: ${ran.join(', ')}`);
});

test('a signal that has aborted already never runs the callback', () => {
  const ac = new AbortController();
  ac.abort();
  let ran = false;
  const end = watchAbort(ac.signal, () => (ran = true));
  end();
  assert.not.ok(ran);
  assert.is(getEventListeners(ac.signal, 'abort').length, 0);
});

test('a signal that aborted is let go of: a new one for the same code starts afresh', () => {
  const first = new AbortController();
  watchAbort(first.signal, () => {});
  first.abort();
  const second = new AbortController();
  let ran = 0;
  watchAbort(second.signal, () => ran++);
  second.abort();
  assert.is(ran, 1);
});

test('what an ended watch held dies young; a removed listener on a long-lived signal is promoted', () => {
  const signal = new AbortController().signal;
  const viaWatch = promotedByChurn({
    add: (value) => watchAbort(signal, () => void value),
    remove: (end) => (end as () => void)(),
  });
  const control = new AbortController().signal;
  const viaListener = promotedByChurn({
    add: (value) => {
      const listener = () => void value;
      control.addEventListener('abort', listener, { once: true });
      return listener;
    },
    remove: (listener) => control.removeEventListener('abort', listener as () => void),
  });
  assert.ok(viaWatch < 1_000_000, `watchAbort: the old generation grew ${viaWatch} bytes`);
  assert.ok(viaListener > 4_000_000, `the control: listeners grew it only ${viaListener} bytes, so this test could not tell them apart`);
});

test.run();
