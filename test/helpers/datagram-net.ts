/**
 * An in-memory datagram network for tests of anything that runs over a
 * DatagramEndpoint: endpoints at made-up addresses, and a `fate` hook that
 * decides what happens to each datagram in flight (deliver, drop, duplicate,
 * delay: random delays reorder). A NAT-like `move` gives an endpoint a new
 * public address mid-test (roaming): peers then see datagrams from the new
 * address, and datagrams to the old one go nowhere.
 *
 *   const net = new DatagramNet({ fate: (d) => (d.data[0] === 1 && d.seq === 0 ? 'drop' : 'deliver') });
 *   const a = net.endpoint('10.0.0.1:1000');
 *
 * Honours the DatagramEndpoint contract: nothing is delivered before start()
 * (early datagrams are kept); every delivered datagram is a buffer of its
 * own (the receiver's to keep, as from a real socket).
 */
import type { DatagramEndpoint, DatagramHandlers } from '../../core/types.ts';

export interface InFlight {
  /** A copy of the datagram. */
  readonly data: Buffer;
  /** The sender's public address, as the receiver will see it. */
  readonly from: string;
  readonly to: string;
  /** Counts the datagrams sent so far on the whole net, from 0. */
  readonly seq: number;
}

/** What happens to one datagram: delivered (after delayMs), dropped, or delivered twice. */
export type Fate = 'deliver' | 'drop' | 'duplicate' | { delayMs: number; copies?: number };

export interface DatagramNetOptions {
  fate?: (d: InFlight) => Fate;
  /** maxDatagramSize of every endpoint (default 1457: udp's default mtu 1420 + 37). */
  maxDatagramSize?: number;
}

export interface MemEndpoint extends DatagramEndpoint {
  /** Datagrams and bytes this endpoint handed to send(), per destination address and in total. */
  readonly sent: { count: number; bytes: number; to: Map<string, number> };
  /** What peers see as `from` (changes with net.move). */
  readonly publicAddress: string;
  readonly closed: boolean;
  /** 0: send() copies each datagram, so it holds none. A test may set it to make senders assume it holds them. */
  pending: number;
}

export class DatagramNet {
  /** Every datagram the fate hook dropped, and every one delivered, for assertions. */
  readonly dropped: InFlight[] = [];
  delivered = 0;
  private seq = 0;
  private readonly routes = new Map<string, MemEndpointImpl>();
  private readonly timers = new Set<NodeJS.Timeout>();

  constructor(readonly opts: DatagramNetOptions = {}) {}

  endpoint(address: string): MemEndpoint {
    if (this.routes.has(address)) throw new Error(`datagram-net: ${address} is taken`);
    const e = new MemEndpointImpl(this, address, this.opts.maxDatagramSize ?? 1457);
    this.routes.set(address, e);
    return e;
  }

  /** NAT rebinding: `e` is now reached at, and sends from, `address`; its old address is gone. */
  move(e: MemEndpoint, address: string): void {
    const impl = e as MemEndpointImpl;
    this.routes.delete(impl.publicAddress);
    impl.publicAddress = address;
    this.routes.set(address, impl);
  }

  /** Stops every pending delivery. */
  close(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
  }

  /** @internal */
  carry(data: Buffer, from: string, to: string): void {
    const d: InFlight = { data, from, to, seq: this.seq++ };
    const fate = this.opts.fate?.(d) ?? 'deliver';
    if (fate === 'drop') {
      this.dropped.push(d);
      return;
    }
    const copies = fate === 'duplicate' ? 2 : typeof fate === 'object' ? (fate.copies ?? 1) : 1;
    const delayMs = typeof fate === 'object' ? fate.delayMs : 0;
    for (let i = 0; i < copies; i++) {
      const deliver = () => {
        this.timers.delete(timer);
        const target = this.routes.get(to);
        if (target === undefined) return; // nobody there (any more)
        this.delivered++;
        target.receive(Buffer.from(data), from);
      };
      const timer = setTimeout(deliver, delayMs);
      this.timers.add(timer);
    }
  }

  /** @internal */
  gone(e: MemEndpointImpl): void {
    if (this.routes.get(e.publicAddress) === e) this.routes.delete(e.publicAddress);
  }
}

class MemEndpointImpl implements MemEndpoint {
  readonly sent = { count: 0, bytes: 0, to: new Map<string, number>() };
  closed = false;
  pending = 0;
  private handlers: DatagramHandlers | undefined;
  private early: Array<{ data: Buffer; from: string }> = [];

  constructor(
    private readonly net: DatagramNet,
    public publicAddress: string,
    readonly maxDatagramSize: number,
  ) {}

  get localAddress(): string {
    return this.publicAddress;
  }

  start(handlers: DatagramHandlers): void {
    if (this.handlers) throw new Error('datagram-net: start() called twice');
    this.handlers = handlers;
    const early = this.early;
    this.early = [];
    setImmediate(() => {
      for (const { data, from } of early) this.receive(data, from);
    });
  }

  send(datagram: Buffer, to: string): boolean {
    if (datagram.length > this.maxDatagramSize) throw new RangeError(`datagram-net: ${datagram.length} bytes > ${this.maxDatagramSize}`);
    if (this.closed) return false;
    this.sent.count++;
    this.sent.bytes += datagram.length;
    this.sent.to.set(to, (this.sent.to.get(to) ?? 0) + 1);
    this.net.carry(Buffer.from(datagram), this.publicAddress, to);
    return true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.net.gone(this);
    const handlers = this.handlers;
    if (handlers) setImmediate(() => handlers.close());
  }

  receive(data: Buffer, from: string): void {
    if (this.closed) return;
    if (!this.handlers) {
      this.early.push({ data, from });
      return;
    }
    this.handlers.datagram(data, from);
  }
}

/** A small deterministic PRNG (mulberry32) for reproducible loss and reordering. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
