/**
 * Rounds of systems in one sitting, for the diagnostic scripts that compare
 * a few TUN systems in the bench topology (ping-spacing.ts, ping-footprint.ts,
 * relay-floor.ts, syscall-gaps.ts).
 *
 * Builds the topology, then in each round starts every system in turn,
 * warms it up as the bench does (2 s of iperf3 unless it is the baseline,
 * then 50 pings), hands it to `measure`, and stops it before the next one
 * starts. Every other round goes through the systems backwards, so no
 * system always runs first on a machine whose speed drifts. Everything it
 * started is stopped and removed, whatever happens; an error ends the
 * sitting and is thrown.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { warmUpTunnel } from './measure.ts';
import type { Running, SystemSpec } from './peers.ts';
import { createBenchTopology, type BenchTopology } from './topology.ts';

export interface Sitting {
  /** Systems by the name the script reports them under. */
  systems: Array<[name: string, spec: SystemSpec]>;
  rounds: number;
  /** Prefix of each system's temporary directory. */
  workPrefix: string;
  /** Measure one system, started and warmed up; `backwards` tells the round's order. */
  measure(name: string, running: Running, bt: BenchTopology, round: number, backwards: boolean): Promise<void>;
}

export async function runSitting(s: Sitting): Promise<void> {
  const bt = await createBenchTopology();
  try {
    for (let round = 0; round < s.rounds; round++) {
      const backwards = round % 2 === 1;
      for (const [name, spec] of backwards ? [...s.systems].reverse() : s.systems) {
        const work = mkdtempSync(join(tmpdir(), s.workPrefix));
        try {
          const running = await spec.start(bt, work);
          try {
            await warmUpTunnel(bt, spec.role === 'baseline');
            await s.measure(name, running, bt, round, backwards);
          } finally {
            await running.stop();
          }
        } finally {
          rmSync(work, { recursive: true, force: true });
        }
      }
    }
  } finally {
    bt.cleanup();
  }
}
