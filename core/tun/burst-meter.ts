/**
 * Whether events come in bursts, for the threads that decide who reads a TUN
 * queue (device.ts, and a packet thread that borrows the reading,
 * core/datapath/packet-worker.ts).
 */

/** Packets per millisecond on a TUN queue from which its pump does the reads or the writes. */
export const TUN_BURST = 16;

/**
 * Counts events in windows of 1 ms and says whether they come in bursts:
 * `burst` or more in the current window, or in the window just before it.
 */
export class BurstMeter {
  private start = -Infinity;
  private count = 0;
  private busy = false;

  constructor(private readonly burst: number) {}

  /** Count one event at `now` (performance.now()); true while events come in bursts. */
  tick(now: number): boolean {
    if (now - this.start >= 1) {
      this.busy = this.count >= this.burst && now - this.start < 2;
      this.start = now;
      this.count = 0;
    }
    if (++this.count >= this.burst) this.busy = true;
    return this.busy;
  }
}
