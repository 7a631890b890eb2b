/**
 * watchAbort(signal, fn): fn runs once when `signal` aborts, unless the
 * returned function is called first. For the many short operations (a
 * stream's open, an outbound connect) that all watch one signal living as
 * long as the process: the runtime's.
 *
 * Why not signal.addEventListener per operation: Node links an AbortSignal's
 * listeners together, and a removed listener stays linked to the ones added
 * after it. Once one removed listener has been promoted to the old
 * generation, every later one, and everything its closure holds (a stream,
 * a socket, their buffers), hangs off it and survives every scavenge until
 * the next full GC, which dshield makes rare (core/gc-tuning.ts); measured
 * in test/abort-watch.test.ts. Here each
 * signal gets one listener, and the callbacks wait in a Roster, which lets go
 * of what leaves it (core/roster.ts).
 */
import { Roster } from './roster.ts';

/** A callback that is still wanted; `fn` is null once its watch ended (even mid-abort). */
interface Watch {
  fn: (() => void) | null;
}

const watchers = new WeakMap<AbortSignal, Roster<Watch>>();

/** The signal's callbacks, behind the one listener that runs them when it aborts. */
function callbacksOf(signal: AbortSignal): Roster<Watch> {
  const known = watchers.get(signal);
  if (known !== undefined) return known;
  const callbacks = new Roster<Watch>();
  watchers.set(signal, callbacks);
  signal.addEventListener(
    'abort',
    () => {
      watchers.delete(signal);
      for (const watch of callbacks.values()) {
        const fn = watch.fn;
        if (fn === null) continue; // ended by a callback that ran before it
        watch.fn = null;
        try {
          fn();
        } catch (err) {
          queueMicrotask(() => {
            throw err;
          });
        }
      }
    },
    { once: true },
  );
  return callbacks;
}

/**
 * Runs `onAbort` (once) when `signal` aborts, until the returned function is
 * called. Like addEventListener, it never runs for a signal that has already
 * aborted: callers check `signal.aborted` first. A callback that throws does
 * not keep the others from running; its error is reported as uncaught, as a
 * listener's would be.
 */
export function watchAbort(signal: AbortSignal, onAbort: () => void): () => void {
  if (signal.aborted) return () => {};
  const callbacks = callbacksOf(signal);
  const watch: Watch = { fn: onAbort };
  const ticket = callbacks.add(watch);
  return () => {
    watch.fn = null;
    callbacks.remove(ticket);
  };
}
