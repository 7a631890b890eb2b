/**
 * How a section's systems are measured: in turns, so that a system and the
 * ones it is compared against see the same stretch of a shared machine.
 *
 *   turn 1: A, B, C, ...   (run 1 of each)
 *   turn 2: ..., C, B, A   (run 2 of each, the order reversed)
 *   turn 3: A, B, C, ...
 *
 * Measured one system after another instead, each had a stretch of its own,
 * and on this VM the CPU steal moves from minute to minute: in the full run
 * of 06:42 UTC (2026-11-28) the ping rows measured under about 3 % steal
 * came out 0.13 ms slower than those under about 1.5 %, OpenVPN's as
 * dshield's, so the ping target went by which system drew the calmer
 * minutes. In turns, every system's runs are spread over the same stretch.
 *
 *   side by side (proxy mode)  every system is started once, on ports of
 *        its own (SystemSpec.start's slot), warmed up, and left up: an idle
 *        proxy costs nothing while the others take their turns
 *   one at a time (TUN mode)   their tunnels would take the same routes, so
 *        each is started for its turn, warmed up, measured and stopped
 *
 * A system is warmed up after every start, not counted: a process's first
 * traffic also compiles its path (V8's optimizing compiler runs on threads
 * of the same process), which a VPN that runs for hours pays once.
 *
 * Each system's rows are kept only if the web host saw its small requests
 * come from the address its path must give them (the server's, or for the
 * baseline the client's). A system that is missing a tool, fails to start
 * or fails a run gets rows that say so, and takes no more turns.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hasTool } from '../test/helpers/netns.ts';
import { NotAvailable } from './dshield.ts';
import type { Running, SystemSpec } from './peers.ts';
import { StealMeter } from './proc.ts';
import { finish, type Row } from './report.ts';
import type { BenchTopology } from './topology.ts';

export interface MetricDef {
  metric: string;
  label: string;
  unit: string;
  better: 'higher' | 'lower';
  additive?: boolean;
}

/** Per metric: the run values and the CPU seconds / bytes of the system's processes. */
export class Collector {
  readonly values = new Map<string, number[]>();
  readonly cpu = new Map<string, { cpu: number; bytes: number }>();
  readonly extra = new Map<string, unknown[]>();
  add(metric: string, value: number, cpu?: { cpu: number; bytes: number }, extra?: unknown): void {
    (this.values.get(metric) ?? this.values.set(metric, []).get(metric)!).push(value);
    if (cpu) {
      const c = this.cpu.get(metric) ?? { cpu: 0, bytes: 0 };
      this.cpu.set(metric, { cpu: c.cpu + cpu.cpu, bytes: c.bytes + cpu.bytes });
    }
    if (extra !== undefined) (this.extra.get(metric) ?? this.extra.set(metric, []).get(metric)!).push(extra);
  }
}

export function emptyRows(spec: SystemSpec, defs: MetricDef[], status: Row['status'], reason?: string): Row[] {
  return defs.map((d) => ({
    section: spec.mode,
    id: spec.id,
    system: spec.system,
    mode: spec.mode === 'tun' ? 'TUN' : 'SOCKS5',
    cipher: spec.cipher,
    role: spec.role,
    ...d,
    runs: [],
    status,
    reason,
  }));
}

/** One run of a system that is up: what it measures goes into `c`; its small requests carry `marker`. */
export type MeasureRun = (sys: Running, c: Collector, marker: string, run: number) => Promise<void>;

/** What runInTurns measures, and how. */
export interface Turns {
  /** The section's systems, in the order of the first turn. */
  specs: SystemSpec[];
  /** The rows each system gets (the metrics `run` fills in). */
  defs: MetricDef[];
  /** Turns, so runs per system (the median of them is reported). */
  runs: number;
  /** True: all systems up at once, each in its own slot; false: each started for its turn only. */
  sideBySide: boolean;
  /** After every start, not counted. */
  warmUp(sys: Running, spec: SystemSpec): Promise<void>;
  run: MeasureRun;
}

/** A system of the section, across its turns. */
class Entry {
  readonly marker: string;
  readonly c = new Collector();
  /** The steal over its own runs (paused between them). */
  readonly steal = new StealMeter();
  notes: string[] = [];
  /** Seconds spent in its runs. */
  seconds = 0;
  running: { sys: Running; work: string } | undefined;
  /** Its rows once it is done with, or out. */
  rows: Row[] | undefined;

  constructor(
    readonly spec: SystemSpec,
    readonly slot: number,
  ) {
    this.marker = `sys=${encodeURIComponent(spec.id)}`;
    this.steal.pause();
  }
}

/** Every system's rows, in the order of `t.specs`; whatever it started is stopped and removed, whatever happens. */
export async function runInTurns(bt: BenchTopology, t: Turns): Promise<Row[]> {
  const entries = t.specs.map((spec, i) => new Entry(spec, t.sideBySide ? i : 0));
  for (const e of entries) {
    const missing = e.spec.needs.filter((tool) => !hasTool(tool));
    if (missing.length) {
      console.log(`  ${e.spec.id}: skipped (${missing.join(', ')} not installed)`);
      e.rows = emptyRows(e.spec, t.defs, 'skipped', `${missing.join(', ')} not installed`);
    }
  }
  try {
    for (let run = 0; run < t.runs; run++) {
      const order = run % 2 === 0 ? entries : [...entries].reverse();
      console.log(`  turn ${run + 1} of ${t.runs}: ${order.filter((e) => e.rows === undefined).length} systems`);
      for (const e of order) {
        if (e.rows !== undefined) continue;
        try {
          if (e.running === undefined) {
            if (!(await start(bt, e, t.defs))) continue;
            await t.warmUp(e.running!.sys, e.spec);
          }
          const t0 = performance.now();
          e.steal.resume();
          try {
            await t.run(e.running!.sys, e.c, e.marker, run);
          } finally {
            e.steal.pause();
            e.seconds += (performance.now() - t0) / 1000;
          }
        } catch (err) {
          const why = (err as Error).message.split('\n')[0]!;
          console.log(`  ${e.spec.id}: failed while measuring — ${why}`);
          e.rows = emptyRows(e.spec, t.defs, 'failed', why);
        } finally {
          if (!t.sideBySide || e.rows !== undefined) await stop(e);
        }
      }
    }
    for (const e of entries) e.rows ??= rowsOf(bt, e, t.defs);
  } finally {
    await Promise.all(entries.map((e) => stop(e)));
  }
  return entries.flatMap((e) => e.rows!);
}

/** Start `e` (in its slot); on failure its rows say why, and false. */
async function start(bt: BenchTopology, e: Entry, defs: MetricDef[]): Promise<boolean> {
  const work = mkdtempSync(join(tmpdir(), 'dshield-bench-'));
  try {
    const sys = await e.spec.start(bt, work, e.slot);
    e.running = { sys, work };
    e.notes = sys.notes;
    return true;
  } catch (err) {
    rmSync(work, { recursive: true, force: true });
    const why = (err as Error).message.split('\n')[0]!;
    const status = err instanceof NotAvailable ? 'not available yet' : 'failed';
    console.log(`  ${e.spec.id}: ${status} — ${why}`);
    e.rows = emptyRows(e.spec, defs, status, why);
    return false;
  }
}

async function stop(e: Entry): Promise<void> {
  const r = e.running;
  if (r === undefined) return;
  e.running = undefined;
  await r.sys.stop().catch(() => {});
  rmSync(r.work, { recursive: true, force: true });
}

/** A measured system's rows, once its small requests are shown to have taken its path. */
function rowsOf(bt: BenchTopology, e: Entry, defs: MetricDef[]): Row[] {
  const { spec, c, marker } = e;
  const expected = spec.expectSource === 'server' ? bt.topo.addr.serverWebSide : bt.topo.addr.client;
  const sources = [...new Set(bt.sourcesOf(marker))];
  if (sources.length !== 1 || sources[0] !== expected) {
    const why = `the web host saw requests from ${sources.join(', ') || 'nowhere'}, expected only ${expected}: traffic did not take the system's path`;
    console.log(`  ${spec.id}: failed — ${why}`);
    return emptyRows(spec, defs, 'failed', why);
  }
  const stealPercent = e.steal.percent();
  const rows = defs.map((d): Row => {
    const cpu = c.cpu.get(d.metric);
    return finish({
      ...emptyRows(spec, [d], 'ok')[0]!,
      runs: c.values.get(d.metric) ?? [],
      cpuSecPerGB: cpu && cpu.bytes > 0 ? cpu.cpu / (cpu.bytes / 1e9) : undefined,
      stealPercent,
      extra: { source: expected, notes: e.notes, ...(c.extra.has(d.metric) ? { detail: c.extra.get(d.metric) } : {}) },
    });
  });
  console.log(`  ${spec.id}: ${rows.map((r) => `${r.metric} ${r.median?.toFixed(2)}`).join(', ')} (${e.seconds.toFixed(0)} s measuring, CPU steal ${stealPercent.toFixed(1)} %; web host saw ${expected})`);
  return rows;
}
