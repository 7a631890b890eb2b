/**
 * Two Mux instances wired back to back in memory, for mux tests.
 *
 * Each direction is a Pipe: send() queues the payload and returns false once
 * more than `highWater` bytes wait; delivery is asynchronous (setImmediate),
 * in order, at most `perTick` payloads per turn (a bandwidth limit), and
 * drain() is called on the sender once the queue is below half of highWater.
 * `block()` simulates a congested session: send() returns false and nothing
 * is delivered until `unblock()`. Payloads are delivered as sent, not
 * copied, so a mux that wrote into a payload after passing it to send()
 * would deliver garbage; once delivered, a payload is the receiving mux's.
 */
import { Mux, type MuxOptions } from '../../core/mux.ts';
import { EventBus } from '../../core/events.ts';
import type { Logger, LogLevel } from '../../core/types.ts';

export interface PipeOptions {
  /** Bytes queued above which send() returns false (default 256 KiB). */
  highWater?: number;
  /** Payloads delivered per setImmediate turn (default: all queued). */
  perTick?: number;
}

export class Pipe {
  /** Payloads handed to send(), those under 1 KiB, and how many times send() returned false. */
  sends = 0;
  smallSends = 0;
  falses = 0;
  drains = 0;
  queuedBytes = 0;
  private queue: Buffer[] = [];
  private head = 0;
  private blocked = false;
  private wantsDrain = false;
  private scheduled = false;
  private closed = false;
  private readonly highWater: number;
  private readonly perTick: number;
  target!: Mux;
  source!: Mux;

  constructor(opts: PipeOptions = {}) {
    this.highWater = opts.highWater ?? 256 * 1024;
    this.perTick = opts.perTick ?? Infinity;
  }

  send(payload: Buffer): boolean {
    this.sends++;
    if (payload.length < 1024) this.smallSends++;
    if (this.closed) return false;
    this.queue.push(payload);
    this.queuedBytes += payload.length;
    this.schedule();
    if (this.blocked || this.queuedBytes > this.highWater) {
      this.wantsDrain = true;
      this.falses++;
      return false;
    }
    return true;
  }

  block(): void {
    this.blocked = true;
  }

  unblock(): void {
    this.blocked = false;
    this.schedule();
  }

  close(): void {
    this.closed = true;
    this.queue = [];
    this.queuedBytes = 0;
  }

  private schedule(): void {
    if (this.scheduled || this.closed) return;
    this.scheduled = true;
    setImmediate(() => this.pump());
  }

  private pump(): void {
    this.scheduled = false;
    if (this.closed || this.blocked) return;
    let n = 0;
    while (this.head < this.queue.length && n < this.perTick) {
      const payload = this.queue[this.head];
      this.queue[this.head++] = undefined as unknown as Buffer;
      this.queuedBytes -= payload.length;
      n++;
      this.target.receive(payload);
      if (this.closed || this.blocked) return;
    }
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    } else {
      this.schedule();
    }
    if (this.wantsDrain && this.queuedBytes <= this.highWater / 2) {
      this.wantsDrain = false;
      this.drains++;
      this.source.drain();
    }
  }
}

export interface LogLine {
  level: LogLevel;
  msg: string;
  fields?: Record<string, unknown>;
}

/** A logger that keeps what it is given, for asserting on it. */
export function memoryLogger(lines: LogLine[] = []): Logger & { lines: LogLine[] } {
  const at =
    (level: LogLevel) =>
    (msg: string, fields?: Record<string, unknown>): void => {
      lines.push({ level, msg, fields });
    };
  const log = { lines, debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error'), child: () => log };
  return log;
}

export interface MuxPair {
  client: Mux;
  server: Mux;
  /** client -> server and server -> client. */
  up: Pipe;
  down: Pipe;
  events: EventBus;
  clientLog: ReturnType<typeof memoryLogger>;
  serverLog: ReturnType<typeof memoryLogger>;
  close(): void;
}

type SideOptions = Partial<Omit<MuxOptions, 'side' | 'send' | 'log'>>;

export function muxPair(
  opts: { client?: SideOptions; server?: SideOptions; up?: PipeOptions; down?: PipeOptions } = {},
): MuxPair {
  const up = new Pipe(opts.up);
  const down = new Pipe(opts.down);
  const events = new EventBus();
  const clientLog = memoryLogger();
  const serverLog = memoryLogger();
  const client = new Mux({
    maxPayload: 65518,
    events,
    ...opts.client,
    side: 'client',
    log: clientLog,
    send: (p) => up.send(p),
  });
  const server = new Mux({
    maxPayload: 65518,
    events,
    client: 'alice',
    ...opts.server,
    side: 'server',
    log: serverLog,
    send: (p) => down.send(p),
  });
  up.source = client;
  up.target = server;
  down.source = server;
  down.target = client;
  return {
    client,
    server,
    up,
    down,
    events,
    clientLog,
    serverLog,
    close() {
      up.close();
      down.close();
      client.close();
      server.close();
    },
  };
}
