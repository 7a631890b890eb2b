/**
 * Watches a real Link for tests: starts it with handlers that copy every
 * record (the link may reuse its buffers), count drains and closes, and lets
 * a test wait, with a time bound, for a condition on what arrived.
 */
import type { Link, LinkHandlers } from '../../core/types.ts';
import { withTimeout } from './timeout.ts';

export interface LinkProbe {
  readonly link: Link;
  /** Copies of the records delivered so far, in order. */
  readonly records: Buffer[];
  /** Every close handler call, with its error (should only ever hold one). */
  readonly closes: (Error | undefined)[];
  readonly drains: number;
  /** Starts the link with the probe's handlers (unless `start: false` was given, then call this). */
  start(): void;
  /** Resolves when `cond()` holds (checked after every event and every 10 ms). */
  until(cond: () => boolean, ms: number, what: string): Promise<void>;
  /** Resolves at the next drain. */
  nextDrain(ms: number): Promise<void>;
}

export function probeLink(link: Link, opts: { start?: boolean } = {}): LinkProbe {
  const records: Buffer[] = [];
  const closes: (Error | undefined)[] = [];
  let drains = 0;
  const drainWaiters: (() => void)[] = [];
  const handlers: LinkHandlers = {
    record: (r) => void records.push(Buffer.from(r)),
    drain: () => {
      drains++;
      for (const w of drainWaiters.splice(0)) w();
    },
    close: (err) => void closes.push(err),
  };
  const probe: LinkProbe = {
    link,
    records,
    closes,
    get drains() {
      return drains;
    },
    start: () => link.start(handlers),
    until(cond, ms, what) {
      if (cond()) return Promise.resolve();
      let timer: NodeJS.Timeout | undefined;
      return withTimeout(
        new Promise<void>((resolve) => {
          timer = setInterval(() => cond() && resolve(), 10);
        }),
        ms,
        what,
      ).finally(() => clearInterval(timer));
    },
    nextDrain(ms) {
      return withTimeout(new Promise<void>((resolve) => drainWaiters.push(resolve)), ms, 'a drain');
    },
  };
  if (opts.start !== false) probe.start();
  return probe;
}

/** Sends every record, waiting for a drain whenever send() says stop. */
export async function sendAll(probe: LinkProbe, records: Buffer[], drainMs = 10_000): Promise<void> {
  for (const r of records) {
    if (!probe.link.send(r)) await probe.nextDrain(drainMs);
  }
}

/** A record whose content is a function of (index, size), so the receiver can check it. */
export function patterned(index: number, size: number): Buffer {
  const b = Buffer.allocUnsafe(size);
  for (let j = 0; j < size; j++) b[j] = (index * 31 + j * 7) & 0xff;
  if (size >= 4) b.writeUInt32BE(index >>> 0, 0);
  return b;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
