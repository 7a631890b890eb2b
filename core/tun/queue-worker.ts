/**
 * Worker entry: the pump between one TUN queue fd and the main thread.
 *
 *   TUN fd --read--> rx ring --(Atomics.notify)--> main thread onPacket
 *   main thread write() --> tx ring --(eventfd wake)--> TcpCoalescer --write--> TUN fd
 *                                    (a device without a vnet header: --write--> TUN fd)
 *
 * The pump reads only while CTRL_READER says so (packets coming fast); when
 * none came for PUMP_HAND_BACK_MS it hands reading back to the main thread,
 * whose event loop then reads the fd itself (main-reader.ts).
 *
 * The loop blocks in poll(2) only when there is nothing to do, so under load
 * neither side pays for a wake-up: packets that arrive while the other side is
 * busy are handed over in one go. When the rx ring is full the pump stops
 * reading and the kernel's queue (txqueuelen) fills and drops, which is how
 * an IP device sheds load; memory never grows.
 *
 * workerData: PumpData. The worker never closes the fds: the main thread does
 * once this thread has exited, so no fd number is used after it was reused.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { TunQueueIo } from './queue-io.ts';
import { PacketRing } from './ring.ts';
import { TcpCoalescer, VNET_HDR_LEN } from './tcp-coalesce.ts';
import {
  CTRL_ENDED,
  CTRL_ERRNO,
  CTRL_READER,
  CTRL_STOP,
  CTRL_TX_ERRORS,
  CTRL_TX_MERGED,
  PUMP_HAND_BACK_BELOW,
  PUMP_HAND_BACK_MS,
  READER_MAIN,
  READER_PUMP,
  type PumpData,
} from './pump-protocol.ts';

const data = workerData as PumpData;
const io = new TunQueueIo(data.fd, data.wakeFd);
const rx = new PacketRing(data.rx);
const tx = new PacketRing(data.tx);
const ctrl = new Int32Array(data.ctrl);
/** Packets per batch before checking the other direction (fairness, latency). */
const BATCH = 256;

function notifyMain(): void {
  Atomics.add(rx.int32, PacketRing.SEQ_INDEX, 1);
  Atomics.notify(rx.int32, PacketRing.SEQ_INDEX);
}

function run(): void {
  let rxBlocked = false;
  // Packets read in the current hand-back window (see PUMP_HAND_BACK_BELOW).
  let windowStart = performance.now();
  let windowReads = 0;
  // What the kernel refuses is counted per write: a merged run that fails counts once.
  // A device without a vnet header (the kernel refused it) cannot take a merged run: each packet is written as it came.
  const coalescer =
    io.headerLength > 0
      ? new TcpCoalescer((frame) => {
          if (!io.writeFrame(frame)) Atomics.add(ctrl, CTRL_TX_ERRORS, 1);
        })
      : undefined;
  const writeOne = (p: Uint8Array) => {
    if (!(coalescer === undefined ? io.write(p) : coalescer.push(p))) Atomics.add(ctrl, CTRL_TX_ERRORS, 1);
  };
  // Written before the ring's space is released: main writes a packet itself only into an empty ring, so nothing may still wait here then.
  const writeRest = () => {
    if (coalescer === undefined) return;
    coalescer.flush();
    Atomics.add(ctrl, CTRL_TX_MERGED, coalescer.takeMerged());
  };
  while (Atomics.load(ctrl, CTRL_STOP) === 0) {
    // Main thread -> TUN, a run of one TCP flow's segments as one packet.
    const written = tx.consume(writeOne, BATCH, writeRest);
    if (written > 0 && tx.takeProducerWaiting()) notifyMain();

    // TUN -> main thread: drain what the kernel has queued, up to a batch.
    const reader = Atomics.load(ctrl, CTRL_READER);
    const reading = reader !== READER_MAIN;
    let got = 0;
    rxBlocked = false;
    while (reading && got < BATCH) {
      // A record is the packet behind room for the device's vnet header (used or not), which main skips.
      let slot = rx.reserve(VNET_HDR_LEN + data.maxPacket);
      if (slot === null) {
        rx.markProducerWaiting();
        slot = rx.reserve(VNET_HDR_LEN + data.maxPacket); // the consumer may have freed space meanwhile
        if (slot === null) {
          rxBlocked = true;
          break;
        }
      }
      const n = io.read(slot, VNET_HDR_LEN);
      if (n === 0) break;
      rx.commit(VNET_HDR_LEN + n);
      got++;
    }
    if (got > 0 && rx.publish()) notifyMain();
    windowReads += got;
    if (got === BATCH || written === BATCH) continue;

    // Nothing left: sleep until the fd is readable or main wakes us (tx data,
    // rx space, stop). The flag + re-check pairs with main's publish().
    if (!tx.prepareToWait()) continue;
    const mayHandBack = reader === READER_PUMP && !rxBlocked;
    if (mayHandBack) {
      const now = performance.now();
      if (now - windowStart >= PUMP_HAND_BACK_MS) {
        const slow = windowReads < PUMP_HAND_BACK_BELOW;
        windowStart = now;
        windowReads = 0;
        if (slow) {
          // Packets come one at a time again: the main thread reads (it drains the ring first).
          Atomics.store(ctrl, CTRL_READER, READER_MAIN);
          notifyMain();
          tx.doneWaiting();
          continue;
        }
      }
    } else {
      windowStart = performance.now();
      windowReads = 0;
    }
    io.wait(reading && !rxBlocked, mayHandBack ? Math.max(1, Math.ceil(windowStart + PUMP_HAND_BACK_MS - performance.now())) : -1);
    tx.doneWaiting();
  }
}

// openTun resolves only once every pump is here: packets routed to the
// device before that would wait in the kernel queue for the module to load.
parentPort?.postMessage('ready');
try {
  run();
} catch (err) {
  const e = (err as { detail?: { errno?: number } }).detail?.errno;
  Atomics.store(ctrl, CTRL_ERRNO, typeof e === 'number' ? e : -1);
  parentPort?.postMessage({ error: (err as Error).message ?? String(err) });
} finally {
  Atomics.store(ctrl, CTRL_ENDED, 1);
  notifyMain();
}
