/**
 * Joins two duplex streams both ways, the way a proxy does: each side's
 * readable feeds the other's writable with backpressure (pipe), an end is
 * passed on as a half-close, and an error or abort on either side destroys
 * both. Resolves once both sides have closed.
 */
import type { Duplex } from 'node:stream';

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
    a.pipe(b);
    b.pipe(a);
  });
}
