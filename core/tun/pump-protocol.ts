/**
 * What the main thread (device.ts) and a TUN queue's pump worker
 * (queue-worker.ts) share: the workerData shape and the slots of the
 * control Int32Array.
 */

export interface PumpData {
  /** The TUN queue fd (O_NONBLOCK). The main thread closes it after the worker exits. */
  fd: number;
  /** The eventfd main writes to wake the worker. Closed by the main thread too. */
  wakeFd: number;
  /** Largest packet to read (the device MTU, or 65535). */
  maxPacket: number;
  /** PacketRing buffers: TUN -> main, main -> TUN. */
  rx: SharedArrayBuffer;
  tx: SharedArrayBuffer;
  /** Int32 slots below. */
  ctrl: SharedArrayBuffer;
}

/** Main sets it, then wakes the worker: finish and close the fds. */
export const CTRL_STOP = 0;
/** The worker sets it when its loop has ended (on STOP or on a fatal error), then notifies. */
export const CTRL_ENDED = 1;
/** Packets the kernel refused on write (malformed, device down). */
export const CTRL_TX_ERRORS = 2;
/**
 * Who reads the TUN fd: READER_MAIN (the main thread's event loop, while
 * packets come one at a time; see main-reader.ts) or READER_PUMP. Main hands
 * reading to the pump when packets come fast; the pump hands it back at the
 * end of a PUMP_HAND_BACK_MS window in which it read fewer than
 * PUMP_HAND_BACK_BELOW packets (not only after silence: a ping every 10 ms
 * after a download must not keep the pump reading, two wake-ups a packet). Each side changes it only while it is
 * the reader, and stops reading before it does, so packets keep their order.
 * READER_PUMP_ONLY: the main thread cannot read this fd; the pump never hands back.
 */
export const CTRL_READER = 3;
export const READER_MAIN = 0;
export const READER_PUMP = 1;
export const READER_PUMP_ONLY = 2;
export const PUMP_HAND_BACK_MS = 20;
export const PUMP_HAND_BACK_BELOW = 16;
/** errno of the fatal error, -1 if it was not a syscall error. */
export const CTRL_ERRNO = 4;
/** Packets the pump wrote merged into the run of TCP segments before them (tcp-coalesce.ts). */
export const CTRL_TX_MERGED = 5;
export const CTRL_SLOTS = 8;
