/**
 * A consumer for splice tests: a duplex whose writable side keeps a copy of
 * every chunk and acknowledges each write a turn later (as a socket does
 * once the kernel took it); its readable side stays empty.
 */
import { createHash } from 'node:crypto';
import { Duplex } from 'node:stream';

export class Collector extends Duplex {
  readonly chunks: Buffer[] = [];

  constructor() {
    super({ allowHalfOpen: true });
  }

  override _read(): void {}

  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.chunks.push(Buffer.from(chunk));
    setImmediate(cb);
  }
}

/** SHA-256 of the buffers, in order, as hex: compares what arrived with what was sent. */
export function sha256Of(buffers: Buffer | Buffer[]): string {
  const h = createHash('sha256');
  for (const b of Array.isArray(buffers) ? buffers : [buffers]) h.update(b);
  return h.digest('hex');
}
