/**
 * transport "udp": one record per UDP datagram (node:dgram, udp4 or udp6 by
 * the address family).
 *
 * This plugin is the dumb half, like wireguard-go's conn.Bind: it binds a
 * socket and moves datagrams to and from numeric addresses. Sessions,
 * indices, the replay window, roaming and handshake retransmission live in
 * core/session-datagram.ts.
 *
 * Sizes: `mtu` is the tunnel's MTU (the TUN device's, default 1420 as in
 * WireGuard). Datagrams are sized so that an IP packet of `mtu` bytes fits
 * one record with its mux frame: maxDatagramSize = mtu + 7 (mux frame
 * header) + 30 (record header 13, record type 1, AEAD tag 16) = 1457 by
 * default. On the wire that is an IP packet of mtu + 65 bytes over IPv4 and
 * mtu + 85 over IPv6, which must fit the path MTU (1500 on most links: mtu
 * 1435 at most over IPv4, 1415 over IPv6; lower it for PPPoE or tunnels in
 * tunnels). A larger datagram is fragmented by the kernel or dropped on the
 * way, so a wrong mtu costs speed or reachability, never safety.
 *
 * The data path (IPv4 sockets, where koffi loads; core/udp-io.ts): after
 * dgram delivers a datagram the endpoint reads what else is queued with
 * recvfrom(2), up to RECEIVE_BATCH, without a callback per datagram. A send
 * is copied into a batch (core/segment-batch.ts) that leaves at the end of
 * the microtask, or sooner when a datagram cannot join it (another peer, a
 * larger size, a full batch): one datagram with sendto(2), more with one
 * sendmsg(2) and UDP_SEGMENT (UDP GSO), so a burst of TUN packets crosses
 * the kernel's stack once. Where the kernel refuses GSO on a path, the
 * endpoint sends one by one from then on (for that size and larger, when the
 * segment did not fit the path MTU). Option gso: false sends each datagram
 * with sendto(2) within the call. Elsewhere, and whenever the kernel's send
 * buffer is full, node:dgram does the work as before.
 *
 * Sending through dgram: it has no backpressure signal, so the endpoint
 * counts sends the OS has not confirmed; at `sendQueue` of them send() drops
 * the datagram and returns false (UDP may drop), and drain follows once half
 * have completed. While any are in flight, later sends queue behind them in
 * dgram too. Addresses are numeric on the data path: the socket's lookup
 * function refuses names, so no datagram waits for DNS.
 */
import dgram from 'node:dgram';
import { lookup as dnsLookup } from 'node:dns/promises';
import { isIP } from 'node:net';
import { definePlugin } from '../core/define.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';
import { formatHostPort, parseHostPort } from '../core/hostport.ts';
import { describeListenError } from '../core/net-errors.ts';
import { FRAME_HEADER } from '../core/mux.ts';
import { datagramSizeFor } from '../core/session-datagram.ts';
import type { DatagramEndpoint, DatagramHandlers, DatagramTransportPlugin, Logger } from '../core/types.ts';
import { EAGAIN, EINVAL, EIO, EMSGSIZE, ENOBUFS, ENOPROTOOPT, EOPNOTSUPP } from '../core/errno.ts';
import { MAX_BYTES as MAX_SEGMENT_BYTES, SegmentBatch } from '../core/segment-batch.ts';
import { dgramFd, openUdpIo, setDgramReading, sockaddrIn, type UdpIo } from '../core/udp-io.ts';

/** The largest UDP payload over IPv4 (65535 - 20 - 8). */
const MAX_UDP_PAYLOAD = 65507;
/** Datagrams kept for an endpoint whose owner has not called start() yet. */
const PRESTART_LIMIT = 64;
/** close() waits this long at most for sends in flight before releasing the socket. */
const CLOSE_GRACE_MS = 1000;
/** At most one send error is logged per this interval (with a count of the others). */
const ERROR_LOG_INTERVAL_MS = 10_000;
/** Parsed destinations remembered per endpoint (a server talks to many peers); cleared when full. */
const ADDRESS_CACHE_LIMIT = 4096;
/** Datagrams read per wake-up after the one dgram delivered, before other work gets a turn. */
const RECEIVE_BATCH = 64;
/**
 * A datagram that comes within this long of the one before is taken as part
 * of a burst, and what queued behind it is read in a batch; a lone one (a
 * ping, a request after a pause) is not followed by a read that would only
 * find the queue empty (10-12 µs on a CPU back from idle, four times per
 * ping through the tunnel). The second datagram of a burst starts the batch.
 */
const BURST_GAP_MS = 1;
/** Room for any UDP payload, so no datagram read directly is cut short. */
const RECEIVE_BUFFER_SIZE = 65536;

export interface UdpOptions {
  mtu: number;
  recvBufferSize: number;
  sendBufferSize: number;
  sendQueue: number;
  gso: boolean;
}

interface Destination {
  host: string;
  port: number;
  /** struct sockaddr_in for direct sends (IPv4 sockets); undefined: through dgram. */
  sockaddr: Buffer | undefined;
}

/**
 * dgram's lookup hook: numeric addresses pass through synchronously (so a
 * send goes out within the call), names are refused. (Node passes the
 * socket's family as the second argument, whatever @types/node says.)
 */
function numericOnly(address: string, _family: unknown, callback: (err: NodeJS.ErrnoException | null, address: string, family: number) => void): void {
  const kind = isIP(address);
  if (kind === 0) {
    const err: NodeJS.ErrnoException = Object.assign(new Error(`not a numeric address: ${address}`), { code: 'ENOTFOUND' });
    callback(err, address, 0);
    return;
  }
  callback(null, address, kind);
}

/** "ip:port" / "[ipv6]:port" as DatagramHandlers.datagram reports them; RangeError otherwise. */
function parseDestination(to: string): Destination {
  let host: string;
  let portText: string;
  if (to.startsWith('[')) {
    const close = to.indexOf(']');
    host = to.slice(1, close);
    portText = close > 0 && to[close + 1] === ':' ? to.slice(close + 2) : '';
  } else {
    const colon = to.lastIndexOf(':');
    host = to.slice(0, colon);
    portText = colon > 0 ? to.slice(colon + 1) : '';
  }
  const port = Number(portText);
  // IPv6 only in brackets, IPv4 only without: one spelling per address, as `from` gives it.
  const family = isIP(host);
  if (family !== (to.startsWith('[') ? 6 : 4) || !/^\d{1,5}$/.test(portText) || port < 1 || port > 65535) {
    throw new RangeError(`udp transport: "${to.slice(0, 60)}" is not a numeric ip:port destination`);
  }
  return { host, port, sockaddr: undefined };
}

class UdpEndpoint implements DatagramEndpoint {
  readonly localAddress: string;
  private handlers: DatagramHandlers | undefined;
  private early: Array<{ data: Buffer; from: string }> = [];
  private readonly destinations = new Map<string, Destination>();
  private inflight = 0;
  private wantsDrain = false;
  private closing = false;
  private socketClosed = false;
  private closeDelivered = false;
  private error: Error | undefined;
  private graceTimer: NodeJS.Timeout | undefined;
  private sendErrors = 0;
  private lastErrorLog = 0;
  /** Direct sendto/recvfrom on the socket's fd; undefined once the socket closes, or where unavailable. */
  private io: UdpIo | undefined;
  private receiveBuffer: Buffer | undefined;
  /** performance.now() of the last datagram dgram delivered. */
  private lastMessageAt = -Infinity;
  /** Datagrams dropped because too many sends were in flight (for debugging). */
  dropped = 0;
  /** Datagrams waiting for the end of the microtask to leave in one GSO send; undefined: no batching. */
  private batch: SegmentBatch<Destination> | undefined;
  /** Datagrams larger than this are not batched (lowered when the kernel refuses a segment size). */
  private batchLimit: number;
  private flushQueued = false;
  /** GSO sends the kernel took, and datagrams they carried (for debugging and tests). */
  gsoSends = 0;
  gsoDatagrams = 0;

  constructor(
    private readonly socket: dgram.Socket,
    readonly maxDatagramSize: number,
    private readonly sendQueue: number,
    gso: boolean,
    private readonly log: Logger,
    private readonly onGone: (e: UdpEndpoint) => void,
  ) {
    const bound = socket.address();
    this.localAddress = formatHostPort(bound.address, bound.port);
    this.io = openUdpIo(socket);
    if (gso && this.io?.canSendSegments === true) this.batch = new SegmentBatch<Destination>();
    this.batchLimit = Math.min(maxDatagramSize, MAX_SEGMENT_BYTES);
    socket.on('message', (data, rinfo) => {
      if (this.closing) return;
      // dgram hands each message its own buffer; formatHostPort keeps ::ffff:a.b.c.d as is, so send() can answer it.
      const from = formatHostPort(rinfo.address, rinfo.port);
      const handlers = this.handlers;
      if (handlers === undefined) {
        if (this.early.length < PRESTART_LIMIT) this.early.push({ data, from });
        return;
      }
      const now = performance.now();
      const inBurst = now - this.lastMessageAt < BURST_GAP_MS;
      this.lastMessageAt = now;
      this.deliver(handlers, data, from);
      if (this.io !== undefined && inBurst) this.readQueued(handlers);
    });
    socket.on('error', (err) => {
      // An unconnected UDP socket reports send failures to the send callback;
      // what arrives here means the socket itself is broken.
      this.log.warn('udp socket error; closing the endpoint', { address: this.localAddress, error: err.message });
      this.error ??= err;
      this.close();
    });
    socket.on('close', () => {
      this.socketClosed = true;
      this.io = undefined;
      clearTimeout(this.graceTimer);
      this.onGone(this);
      this.deliverClose();
    });
  }

  start(handlers: DatagramHandlers): void {
    if (this.handlers) throw new Error('udp transport: endpoint.start() called twice');
    this.handlers = handlers;
    // Like a Link, start() itself delivers nothing: what came early follows on the next tick.
    process.nextTick(() => {
      const early = this.early;
      this.early = [];
      for (const { data, from } of early) {
        if (this.closing) break;
        this.deliver(handlers, data, from);
      }
      if (this.socketClosed) this.deliverClose();
    });
  }

  /** Datagrams handed to dgram that it has not sent yet: while 0, the endpoint holds no datagram's memory. */
  get pending(): number {
    return this.inflight;
  }

  /** Whether bursts leave as GSO sends (false where the kernel or koffi cannot, or after the kernel refused). */
  get batching(): boolean {
    return this.batch !== undefined;
  }

  send(datagram: Buffer, to: string): boolean {
    if (datagram.length > this.maxDatagramSize) {
      throw new RangeError(`udp transport: a datagram of ${datagram.length} bytes exceeds maxDatagramSize ${this.maxDatagramSize}`);
    }
    let dest = this.destinations.get(to);
    if (dest === undefined) {
      dest = parseDestination(to);
      if (this.io !== undefined) dest.sockaddr = sockaddrIn(dest.host, dest.port);
      if (this.destinations.size >= ADDRESS_CACHE_LIMIT) this.destinations.clear();
      this.destinations.set(to, dest);
    }
    if (this.closing) return false;
    const batch = this.batch;
    if (batch !== undefined) {
      // Whatever does not join the batch goes after it, so datagrams leave in the order they were sent.
      if (batch.count > 0 && !batch.fits(datagram.length, dest)) this.flush();
      if (this.inflight === 0 && dest.sockaddr !== undefined && datagram.length > 0 && datagram.length <= this.batchLimit) {
        batch.add(datagram, dest);
        if (!this.flushQueued) {
          this.flushQueued = true;
          queueMicrotask(this.flushAtEnd);
        }
        return true;
      }
      if (batch.count > 0) this.flush();
    }
    return this.sendOne(datagram, dest, false);
  }

  /**
   * One datagram: sendto(2) while nothing waits in dgram's queue (so
   * datagrams leave in order), else through dgram, which keeps a reference
   * to the memory (a `copy` of it when the caller's memory is not its own).
   */
  private sendOne(datagram: Buffer, dest: Destination, copy: boolean): boolean {
    const io = this.io;
    if (io !== undefined && this.inflight === 0 && dest.sockaddr !== undefined) {
      const errno = io.send(datagram, dest.sockaddr);
      if (errno === 0) return true;
      if (errno !== EAGAIN && errno !== ENOBUFS) {
        // This datagram failed (no route, refused by a firewall...): lost, as UDP may lose it.
        this.noteSendError(io.error(errno));
        return true;
      }
      // The kernel's send buffer is full: dgram queues the datagram and sends it when there is room.
    }
    if (this.inflight >= this.sendQueue) {
      this.dropped++;
      this.wantsDrain = true;
      return false;
    }
    this.inflight++;
    try {
      this.socket.send(copy ? Buffer.from(datagram) : datagram, dest.port, dest.host, this.sent);
    } catch (err) {
      // dgram throws synchronously only for a socket that is already closed.
      this.inflight--;
      this.noteSendError(err as Error);
      return false;
    }
    if (this.inflight >= this.sendQueue) {
      this.wantsDrain = true;
      return false;
    }
    return true;
  }

  private readonly flushAtEnd = (): void => {
    this.flushQueued = false;
    this.flush();
  };

  /**
   * Sends the batch: one datagram with sendto(2), more with one GSO
   * sendmsg(2). When the kernel's buffer is full they queue in dgram like any
   * other; when it refuses GSO on this path, each goes on its own, and the
   * endpoint stops batching (EIO: no checksum offload; ENOPROTOOPT,
   * EOPNOTSUPP: no UDP GSO) or stops batching datagrams of this size and
   * larger (EMSGSIZE or EINVAL, by kernel version: the segment does not fit
   * the path MTU). Any other errno is one each datagram would have got: the
   * batch is lost, as UDP may lose it.
   */
  private flush(): void {
    const batch = this.batch;
    if (batch === undefined || batch.count === 0) return;
    const io = this.io;
    const dest = batch.to!;
    if (io === undefined) {
      batch.clear(); // the socket closed under the batch: lost, as UDP may lose them
      return;
    }
    const count = batch.count;
    const errno = count === 1 ? io.send(batch.segment(0), dest.sockaddr!) : io.sendSegments(batch.memory, batch.length, batch.segmentSize, dest.sockaddr!);
    if (errno === 0) {
      if (count > 1) {
        this.gsoSends++;
        this.gsoDatagrams += count;
      }
    } else if (count > 1 && (errno === EMSGSIZE || errno === EINVAL || errno === EIO || errno === ENOPROTOOPT || errno === EOPNOTSUPP)) {
      if (errno === EMSGSIZE || errno === EINVAL) {
        this.batchLimit = Math.min(this.batchLimit, batch.segmentSize - 1);
      } else {
        this.batch = undefined;
      }
      this.log.debug('udp GSO refused; sending datagrams one by one', {
        address: this.localAddress,
        error: io.error(errno).code,
        segmentSize: batch.segmentSize,
        batchingBelow: this.batch === undefined ? 0 : this.batchLimit + 1,
      });
      for (let i = 0; i < count; i++) this.sendOne(batch.segment(i), dest, true);
    } else if (errno === EAGAIN || errno === ENOBUFS) {
      for (let i = 0; i < count; i++) this.sendOne(batch.segment(i), dest, true);
    } else {
      // Refused as each of them would have been (no route, a firewall...): lost, as UDP may lose them.
      this.noteSendError(io.error(errno));
    }
    batch.clear();
  }

  handOffReceive(): { fd: number; resume(): void } | undefined {
    // Only where this endpoint reads directly itself (IPv4, koffi): the same conditions hold for the thread.
    if (this.io === undefined || this.closing) return undefined;
    const fd = dgramFd(this.socket);
    if (fd === undefined || !setDgramReading(this.socket, false)) return undefined;
    return {
      fd,
      resume: () => {
        if (!this.socketClosed) setDgramReading(this.socket, true);
      },
    };
  }

  close(): void {
    if (this.closing) return;
    // What was sent before close() goes out first (a session's CLOSE record, typically).
    this.flush();
    this.closing = true;
    this.early = [];
    if (this.inflight === 0) {
      this.closeSocket();
      return;
    }
    // Let what was handed to us go out (a session's CLOSE record, typically).
    this.graceTimer = setTimeout(() => this.closeSocket(), CLOSE_GRACE_MS);
    this.graceTimer.unref();
  }

  private readonly sent = (err: Error | null): void => {
    this.inflight--;
    if (err) this.noteSendError(err);
    if (this.closing) {
      if (this.inflight === 0) this.closeSocket();
      return;
    }
    if (this.wantsDrain && this.inflight <= this.sendQueue >>> 1) {
      this.wantsDrain = false;
      try {
        this.handlers?.drain();
      } catch (e) {
        this.log.error('an endpoint drain handler threw', { error: (e as Error).message });
      }
    }
  };

  /**
   * Reads what the kernel has queued beyond the datagram dgram just
   * delivered, up to RECEIVE_BATCH. Each gets its own buffer (the receiver
   * may keep it), copied from one read buffer sized for any datagram.
   */
  private readQueued(handlers: DatagramHandlers): void {
    const buf = (this.receiveBuffer ??= Buffer.allocUnsafe(RECEIVE_BUFFER_SIZE));
    for (let i = 0; i < RECEIVE_BATCH; i++) {
      const io = this.io;
      if (io === undefined || this.closing) return;
      const n = io.receive(buf);
      if (n < 0) return;
      const data = Buffer.allocUnsafe(n);
      buf.copy(data, 0, 0, n);
      this.deliver(handlers, data, io.from);
    }
  }

  private deliver(handlers: DatagramHandlers, data: Buffer, from: string): void {
    try {
      handlers.datagram(data, from);
    } catch (err) {
      // A bug upstream; one datagram must not take down an endpoint every session shares.
      this.log.error('a datagram handler threw', { from, error: (err as Error).message });
    }
  }

  private noteSendError(err: Error): void {
    this.sendErrors++;
    const now = Date.now();
    if (now - this.lastErrorLog < ERROR_LOG_INTERVAL_MS) return;
    this.lastErrorLog = now;
    this.log.debug('udp send failed', { address: this.localAddress, error: err.message, failures: this.sendErrors });
  }

  private closeSocket(): void {
    if (this.socketClosed) return;
    clearTimeout(this.graceTimer);
    // The fd number may be reused once dgram closes it.
    this.io = undefined;
    try {
      this.socket.close();
    } catch {
      // Already closed: the 'close' event has run or will.
    }
  }

  private deliverClose(): void {
    if (this.closeDelivered || this.handlers === undefined) return;
    this.closeDelivered = true;
    try {
      this.handlers.close(this.error);
    } catch (err) {
      this.log.error('an endpoint close handler threw', { error: (err as Error).message });
    }
  }
}

export default definePlugin<'transport', UdpOptions>({
  kind: 'transport',
  name: 'udp',
  description: 'one record per UDP datagram; sessions roam, records may be lost or reordered (streams need tcp or ws)',
  options: {
    mtu: {
      type: 'number',
      description: 'the tunnel MTU (the TUN device\'s); datagrams carry up to mtu + 37 bytes and must fit the path MTU with their IP/UDP headers',
      default: 1420,
      validate: (v) => (Number.isInteger(v) && (v as number) >= 576 && (v as number) <= 65000 ? undefined : 'must be an integer from 576 to 65000'),
    },
    recvBufferSize: {
      type: 'number',
      description: 'bytes of kernel receive buffer (SO_RCVBUF; the kernel caps it at net.core.rmem_max)',
      default: 4 * 1024 * 1024,
      validate: (v) => (Number.isInteger(v) && (v as number) > 0 ? undefined : 'must be a positive integer'),
    },
    sendBufferSize: {
      type: 'number',
      description: 'bytes of kernel send buffer (SO_SNDBUF; the kernel caps it at net.core.wmem_max)',
      default: 4 * 1024 * 1024,
      validate: (v) => (Number.isInteger(v) && (v as number) > 0 ? undefined : 'must be a positive integer'),
    },
    sendQueue: {
      type: 'number',
      description: 'datagrams in flight to the OS before send() drops and asks the caller to wait',
      default: 1024,
      validate: (v) => (Number.isInteger(v) && (v as number) >= 16 ? undefined : 'must be an integer of at least 16'),
    },
    gso: {
      type: 'boolean',
      description: 'send a burst of datagrams to one peer with one system call (UDP GSO, Linux); false: one sendto(2) each',
      default: true,
    },
  },
  create(options, ctx): DatagramTransportPlugin {
    const mtu = options.mtu ?? 1420;
    const maxDatagramSize = Math.min(MAX_UDP_PAYLOAD, datagramSizeFor(mtu + FRAME_HEADER));
    const recvBufferSize = options.recvBufferSize ?? 4 * 1024 * 1024;
    const sendBufferSize = options.sendBufferSize ?? 4 * 1024 * 1024;
    const sendQueue = options.sendQueue ?? 1024;
    const gso = options.gso ?? true;
    const log = ctx.log;
    const endpoints = new Set<UdpEndpoint>();

    const closeAll = (): void => {
      for (const e of [...endpoints]) e.close();
    };
    ctx.signal.addEventListener('abort', closeAll, { once: true });

    const bind = async (address: string): Promise<DatagramEndpoint> => {
      const { host, port } = parseHostPort(address, 'udp bind address');
      const shown = formatHostPort(host, port);
      const listenError = (why: string, cause?: unknown) =>
        new DshieldError(ErrorCodes.LISTEN, `cannot listen on ${shown}: ${why}`, {
          cause,
          detail: { address: shown, code: (cause as NodeJS.ErrnoException | undefined)?.code },
        });
      if (ctx.signal.aborted) throw listenError('shutting down');
      let ip = host;
      if (isIP(host) === 0) {
        try {
          ip = (await dnsLookup(host)).address;
        } catch (err) {
          throw listenError(describeListenError(err as NodeJS.ErrnoException), err);
        }
      }
      const socket = dgram.createSocket({ type: isIP(ip) === 6 ? 'udp6' : 'udp4', lookup: numericOnly });
      await new Promise<void>((resolve, reject) => {
        const onError = (err: NodeJS.ErrnoException) => {
          socket.close();
          reject(listenError(describeListenError(err), err));
        };
        socket.once('error', onError);
        socket.bind({ address: ip, port, exclusive: true }, () => {
          socket.removeListener('error', onError);
          resolve();
        });
      });
      // The kernel caps these at its *mem_max limits without failing; anything it refuses is not fatal.
      try {
        socket.setRecvBufferSize(recvBufferSize);
        socket.setSendBufferSize(sendBufferSize);
      } catch (err) {
        log.debug('could not set the udp socket buffer sizes', { error: (err as Error).message });
      }
      const endpoint = new UdpEndpoint(socket, maxDatagramSize, sendQueue, gso, log, (e) => endpoints.delete(e));
      endpoints.add(endpoint);
      if (ctx.signal.aborted) endpoint.close();
      log.debug('bound', { address: endpoint.localAddress, maxDatagramSize, gso: endpoint.batching });
      return endpoint;
    };

    return {
      name: 'udp',
      type: 'datagram',
      bind,
      close() {
        ctx.signal.removeEventListener('abort', closeAll);
        closeAll();
      },
    };
  },
});
