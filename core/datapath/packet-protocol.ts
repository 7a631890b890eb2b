/**
 * What the main thread (packet-thread.ts) and the packet thread (packet-worker.ts)
 * say to each other. Main -> thread messages go through a MessagePort that
 * the thread reads with receiveMessageOnPort after an eventfd wake (it never
 * runs an event loop); thread -> main messages arrive as 'message' events.
 */

/** The module and export that make a cipher's in-place AEAD in another thread (CipherPlugin.thread). */
export interface ThreadAeadRef {
  module: string;
  export: string;
}

export interface PacketWorkerData {
  /** A dup of the UDP socket's fd; the thread closes it when it ends. */
  udpFd: number;
  /** eventfd main writes after posting a message. Main closes it after the thread has ended. */
  wakeFd: number;
  aead: ThreadAeadRef;
  /** Int32 slots, below. */
  ctrl: SharedArrayBuffer;
}

/** Datagrams the thread took from the socket (for tests and logs; like CTRL_OPENED, written only by the thread). */
export const CTRL_RECEIVED = 0;
/** Records the thread opened and handled itself (packets written, keepalives). */
export const CTRL_OPENED = 1;
/** Commands main has posted: the thread looks at its port only when this moved. */
export const CTRL_POSTED = 2;
export const CTRL_SLOTS = 3;

/**
 * Per-session counters the thread adds to (Int32Array over a SharedArrayBuffer;
 * only the thread writes them, main reads them with Atomics.load), read by
 * main at least once a second: they wrap, so main takes differences modulo
 * 2^32 (4 GiB a second is beyond this path).
 */
export const STAT_RECORDS = 0;
export const STAT_DATA_RECORDS = 1;
export const STAT_BYTES = 2;
/** Records the thread sealed and sent itself (packets it read from the TUN), and their bytes. */
export const STAT_SENT_RECORDS = 3;
export const STAT_SENT_BYTES = 4;
export const STAT_SLOTS = 5;

/** Main -> thread. */
export type PacketCommand =
  | {
      op: 'sink';
      id: number;
      /** A dup of the TUN fd; the thread closes it on 'unsink' or when it ends. */
      fd: number;
      /** The only IPv4 source address packets may carry (big-endian word), or -1: any. */
      source4: number;
      /** The only IPv6 source address (16 bytes), or null: IPv6 packets go to main. */
      source6: Uint8Array | null;
      maxPacket: number;
      /** STAT_SLOTS Int32 counters for the session behind the sink. */
      stats: SharedArrayBuffer;
      /** Records from any other address go to main (roaming is main's decision); null: any address. */
      recvFrom: string | null;
      /** Where the thread sends what it seals ("a.b.c.d:port"). */
      sendTo: string;
    }
  | {
      op: 'send';
      sink: number;
      /** The session's current sending key and the peer's index for it. */
      key: Uint8Array;
      remoteIndex: number;
      /** BigInt64Array(1) over it: the next counter, shared with main (Atomics.add reserves one). */
      counter: SharedArrayBuffer;
    }
  | { op: 'unsink'; id: number }
  | {
      op: 'reader';
      /** A dup of the TUN queue fd whose lone packets the thread reads (TunReaderLoan); closed on 'unreader'. */
      fd: number;
      /** The pump's control slots and a dup of its eventfd. */
      ctrl: SharedArrayBuffer;
      pumpWakeFd: number;
    }
  | { op: 'unreader' }
  /** Main has stopped reading the socket (after 'udp-busy' and a quiet spell): the thread reads it again. */
  | { op: 'udp' }
  | {
      op: 'keys';
      /** The receiver index the peer writes on these keys' records. */
      index: number;
      sink: number;
      key: Uint8Array;
      /** Date.now() when the keys were made; refused from bornAt + rejectAfterMs. */
      bornAt: number;
      rejectAfterMs: number;
      /** The keys' replay window, shared with main (ReplayWindow.share). */
      window: SharedArrayBuffer;
    }
  | { op: 'peer'; sink: number; peer: string }
  | { op: 'drop'; index: number }
  | { op: 'stop' };

/**
 * Thread -> main. 'ready': the thread reads the socket from now on. 'raw': a datagram the thread did not open (not a DATA
 * record, or under keys it does not hold). 'open': a record the thread
 * authenticated and accepted into its window that main must handle (not
 * only PACKET frames, from another address, or a packet the sink refused);
 * main must not check or decrypt it again. 'tun': a packet the thread read
 * from the TUN but cannot send itself (no session for its destination):
 * main handles it as if the device had read it.
 */
export type PacketEvent =
  /** warmUp: the lone packets the thread sent through its own path before (see warmUp in packet-worker.ts), and the milliseconds that took. */
  | { t: 'ready'; warmUp: { rounds: number; ms: number } }
  /** Datagrams come in bursts: the thread stopped reading the socket; main reads it (its own batched path). */
  | { t: 'udp-busy' }
  | { t: 'raw'; data: Uint8Array; from: string }
  | { t: 'open'; index: number; plaintext: Uint8Array; length: number; from: string }
  | { t: 'tun'; sink: number; packet: Uint8Array }
  | { t: 'ended'; error?: string };
