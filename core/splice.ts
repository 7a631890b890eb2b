/**
 * Joins two duplex streams both ways, the way a proxy does: each side's
 * readable feeds the other's writable with backpressure, an end is passed
 * on as a half-close, and an error or abort on either side destroys both.
 * Resolves once both sides have closed.
 *
 * Why not pipe(): a tunnel record carries up to four 16 KiB DATA frames, and
 * pipe writes each as its own syscall, stopping the source as soon as 16 KiB
 * (a socket's high-water mark) wait. Here the chunks of one event-loop turn
 * are written together: the writable is corked from the first chunk of the
 * turn until the next tick, so they leave as one writev, and the source is
 * paused only once WRITE_AHEAD bytes wait. Measured through SOCKS5 over the
 * tcp transport, 512 MiB down: writes to curl 41k -> 10k and curl's CPU
 * time about a fifth lower; throughput moved within this machine's noise.
 */
import type { Duplex } from 'node:stream';
import { attachPooledSink } from './pooled-reads.ts';
import { viewRelease } from './record-memory.ts';

/**
 * Bytes that may wait in a writable before its source is paused: one
 * 64 KiB tunnel record or socket read, with room for the next. Per stream
 * and direction, on top of the mux's window.
 */
const WRITE_AHEAD = 128 * 1024;

export function splice(a: Duplex, b: Duplex): Promise<void> {
  return new Promise((resolve) => {
    let closed = 0;
    const onClose = (self: Duplex, other: Duplex) => () => {
      // Closed without finishing both directions: the other side must not wait forever.
      if (!(self.readableEnded && self.writableFinished)) other.destroy();
      if (++closed === 2) resolve();
    };
    const onError = (other: Duplex) => (err: Error) => other.destroy(err);
    a.on('error', onError(b));
    b.on('error', onError(a));
    a.on('close', onClose(a, b));
    b.on('close', onClose(b, a));
    forward(a, b);
    forward(b, a);
  });
}

/** from's data into to, corked per turn; from pauses above WRITE_AHEAD until to drains; from's end ends to. */
function forward(from: Duplex, to: Duplex): void {
  let corked = false;
  let paused = false;
  const uncork = (): void => {
    corked = false;
    to.uncork();
  };
  /** Writes one chunk; false once from should stop. `release` runs when to is done with the chunk. */
  const write = (chunk: Buffer, release?: () => void): boolean => {
    if (to.writableEnded || to.destroyed) {
      release?.();
      return true; // it is gone: the close handlers end both
    }
    if (!corked) {
      corked = true;
      to.cork();
      process.nextTick(uncork);
    }
    // A false write sets needDrain, so a 'drain' is due once the buffer empties.
    if (!to.write(chunk, release) && to.writableLength >= WRITE_AHEAD) {
      paused = true;
      return false;
    }
    return true;
  };
  to.on('drain', () => {
    if (!paused) return;
    paused = false;
    from.resume();
  });
  // A socket that does not allow half-open connections ends itself when its peer does; end() again would only make an error (and its stack trace) to throw away.
  from.on('end', () => {
    if (!to.writableEnded && !to.destroyed) to.end();
  });
  // A pooled socket (core/pooled-reads.ts) hands its reads over with a release, and starts reading itself.
  if (attachPooledSink(from, (chunk, release) => write(chunk, release ?? undefined))) return;
  from.on('data', (chunk: Buffer) => {
    // A view of tunnel record memory goes back to its pool once written (core/record-memory.ts).
    if (!write(chunk, viewRelease(chunk))) from.pause();
  });
  // Like pipe(): a source its owner paused (a handshake read) flows from here on.
  from.resume();
}
