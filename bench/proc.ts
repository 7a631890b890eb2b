/**
 * Long-running processes inside a namespace (started through
 * test/helpers/netns.ts spawnIn: own process group, killed by PID when the run
 * ends in any way), with their output, a bounded wait for a line, and the
 * CPU time and memory the kernel accounts to them.
 *
 * `ip netns exec` execs the command in place, so the PID we hold is the
 * command's own: /proc/PID/stat is the system's process (all its threads).
 */
import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { performance } from 'node:perf_hooks';
import { spawnIn, stopChild } from '../test/helpers/netns.ts';
import { ProcessOutput } from '../test/helpers/output.ts';
import type { ChildProcess } from 'node:child_process';

export interface BenchProc {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  output(): string;
  running(): boolean;
  /** First match of `re` in the output; rejects after `ms` or when the process exits first. */
  waitFor(re: RegExp, ms?: number): Promise<RegExpMatchArray>;
  /** SIGTERM, SIGKILL after graceMs; resolves once it is gone. */
  stop(graceMs?: number): Promise<void>;
}

/** Clock ticks per second of /proc/PID/stat (USER_HZ: 100 on every Linux build in practice). */
const HZ = 100;

export function startIn(ns: string, name: string, cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {}): BenchProc {
  const child = spawnIn(ns, cmd, args, {
    cwd: opts.cwd,
    env: { ...process.env, FORCE_COLOR: '0', ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let exited = false;
  // Keep the start (readiness lines) and the end (errors); bulk servers log a lot.
  const out = new ProcessOutput(name, (text, chunk) =>
    text.length > 200_000 ? text.slice(0, 50_000) + text.slice(-100_000) + chunk : text + chunk,
  );
  const onData = (chunk: Buffer) => {
    if (process.env.DSHIELD_BENCH_VERBOSE) process.stderr.write(`[${name}] ${chunk}`);
    out.append(chunk.toString());
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);
  child.once('exit', (code, signal) => {
    exited = true;
    out.ended(signal ?? String(code));
  });
  return {
    name,
    child,
    get pid() {
      return child.pid ?? -1;
    },
    output: () => out.text,
    running: () => !exited,
    waitFor: (re, ms) => out.waitFor(re, ms, tail),
    stop: (graceMs = 5_000) => stopChild(child, graceMs),
  };
}

export function tail(text: string, lines = 15): string {
  return text.trim().split('\n').slice(-lines).join('\n');
}

/** utime + stime of a process (all threads) in seconds; 0 when it is gone. */
export function cpuSeconds(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / HZ;
  } catch {
    return 0;
  }
}

/**
 * Measures the machine's CPU steal over a stretch of time: the share of its
 * CPUs' time that the hypervisor gave to other guests while they had work
 * (/proc/stat's steal column, all CPUs). On a shared VM it is one reason
 * a run of a measurement comes out slower than the next, and it is not the
 * system's. 0 where the kernel reports no steal. It counts from when it is
 * made, except while paused (from pause() to the next resume()).
 */
export class StealMeter {
  private wallSeconds = 0;
  private stolen = 0;
  /** When the stretch being measured began (null: paused). */
  private since: { at: number; stolen: number } | null = null;

  /** Starts measuring at once; `clock` is for tests. */
  constructor(private readonly clock: () => { at: number; stolen: number } = readClock) {
    this.resume();
  }

  /** Stop counting (a system measured in turns: the others' turns are not its own). */
  pause(): void {
    if (this.since === null) return;
    const now = this.clock();
    this.wallSeconds += (now.at - this.since.at) / 1000;
    this.stolen += Math.max(0, now.stolen - this.since.stolen);
    this.since = null;
  }

  resume(): void {
    if (this.since === null) this.since = this.clock();
  }

  /** Percent of the CPUs' time stolen in the stretches measured so far. */
  percent(): number {
    if (this.since !== null) {
      this.pause();
      this.resume();
    }
    return this.wallSeconds > 0 ? (100 * this.stolen) / (this.wallSeconds * cpus().length) : 0;
  }
}

function readClock(): { at: number; stolen: number } {
  return { at: performance.now(), stolen: stolenSeconds() };
}

function stolenSeconds(): number {
  try {
    return stealInProcStat(readFileSync('/proc/stat', 'utf8'));
  } catch {
    return 0;
  }
}

/** The steal, in seconds over all CPUs, in the text of /proc/stat ("cpu user nice system idle iowait irq softirq steal ..."); 0 where the line has no such column. */
export function stealInProcStat(text: string): number {
  const fields = text.split('\n', 1)[0]!.trim().split(/\s+/);
  if (fields[0] !== 'cpu') return 0;
  const ticks = Number(fields[8]);
  return Number.isFinite(ticks) ? ticks / HZ : 0;
}

/** Resident set size in bytes (VmRSS); 0 when it is gone. */
export function rssBytes(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/** CPU seconds the given processes spend while `fn` runs. */
export async function withCpu<T>(pids: number[], fn: () => Promise<T>): Promise<{ value: T; cpu: number }> {
  const before = pids.map(cpuSeconds);
  const value = await fn();
  const cpu = pids.reduce((sum, pid, i) => sum + Math.max(0, cpuSeconds(pid) - before[i]!), 0);
  return { value, cpu };
}
