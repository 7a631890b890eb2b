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
/** errno of the fatal error, -1 if it was not a syscall error. */
export const CTRL_ERRNO = 4;
export const CTRL_SLOTS = 8;
