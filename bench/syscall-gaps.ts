/**
 * Where a ping's time goes in each process of a tunnel: inside its syscalls,
 * or in its own code between them. dshield TUN over udp beside OpenVPN and
 * the null Node relay in dshield's form (a worker thread, a vnet header), in
 * one sitting.
 *
 *   sudo npx tsx bench/syscall-gaps.ts    (Linux, root; perf (Debian: linux-perf), ping, iperf3, openvpn)
 *
 * Why: a ping through a tunnel takes more through dshield than through
 * OpenVPN, and the ping alone cannot say whether the kernel does more
 * (routes, nftables, the TUN) or dshield's own code does. perf records every
 * syscall entry and exit of the tunnel's two processes (the raw_syscalls
 * tracepoints: nothing in the processes changes) while pings go 10 ms apart;
 * in each process the thread with the most calls is the one that carries
 * the packets (syscall-trace.ts). Its time between one call's exit and the
 * next one's entry is its own code (or a wait for a CPU), per step: from
 * recvfrom to write, a datagram read, opened and written into the TUN.
 *
 * Tracing adds a little to every syscall, the same for every system; the
 * figures are for comparing systems in one sitting, not absolute. Not part
 * of `npm run bench`: it has no target; FINDINGS quotes it. Rounds
 * alternate the order of the systems; pings are bounded in count and time,
 * and perf is stopped (by its PID) before the next system starts.
 *
 *   DSHIELD_BENCH_GAPS_CIPHER=chacha20-poly1305 | aes-256-gcm   (default chacha20-poly1305)
 *   DSHIELD_BENCH_GAPS_ROUNDS=3
 *   DSHIELD_BENCH_GAPS_PINGS=500
 *   DSHIELD_BENCH_GAPS_AGAINST=DIR     also dshield from the checkout at DIR (with its own
 *                                      node_modules): an A/B of a change, in the same sitting
 *   DSHIELD_BENCH_GAPS_SYSTEMS=relay,dshield,openvpn,against   which to run (default: all)
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { hasTool } from '../test/helpers/netns.ts';
import { dshieldTun } from './dshield.ts';
import { pingRtt } from './measure.ts';
import { openvpnAes, openvpnChacha, type SystemSpec } from './peers.ts';
import { relay } from './relay-spec.ts';
import { median } from './report.ts';
import { runSitting } from './sittings.ts';
import { busiestThreadSteps, type ThreadSteps } from './syscall-trace.ts';

const CIPHER = process.env.DSHIELD_BENCH_GAPS_CIPHER ?? 'chacha20-poly1305';
const ROUNDS = Math.max(1, Number(process.env.DSHIELD_BENCH_GAPS_ROUNDS ?? 3) || 3);
const PINGS = Math.min(2000, Math.max(50, Number(process.env.DSHIELD_BENCH_GAPS_PINGS ?? 500) || 500));
/** How long perf gets to attach before the pings start, and to write its file after SIGINT. */
const PERF_ATTACH_MS = 1000;
const PERF_STOP_MS = 15_000;
/** A step in at least this many of a round's pings is one a ping takes (others: a wake from main, a burst). */
const STEP_OF_A_PING = 0.9 * PINGS;

function fail(message: string): never {
  console.error(`syscall-gaps: ${message}`);
  process.exit(1);
}

if (CIPHER !== 'chacha20-poly1305' && CIPHER !== 'aes-256-gcm') fail(`DSHIELD_BENCH_GAPS_CIPHER must be chacha20-poly1305 or aes-256-gcm, not ${CIPHER}`);
if (process.platform !== 'linux' || process.getuid?.() !== 0) fail('run it as root on Linux: it builds network namespaces and traces syscalls');
if (process.arch !== 'x64') fail('the syscall numbers it names are x86-64 ones');

const AGAINST = process.env.DSHIELD_BENCH_GAPS_AGAINST;
const WANTED = new Set((process.env.DSHIELD_BENCH_GAPS_SYSTEMS ?? 'relay,dshield,openvpn,against').split(',').map((s) => s.trim()));
const allSystems: Array<[key: string, name: string, spec: () => Promise<SystemSpec>]> = [
  ['relay', 'relay, thread, vnet', async () => relay(CIPHER, ['thread', 'vnet'])],
  ['dshield', `dshield ${commitOf(fileURLToPath(new URL('..', import.meta.url)))}`, async () => dshieldTun('udp', CIPHER)],
  ['openvpn', 'OpenVPN', async () => (CIPHER === 'aes-256-gcm' ? openvpnAes : openvpnChacha)],
];
if (AGAINST !== undefined) {
  // That checkout's own bench/dshield.ts starts that checkout's CLI.
  const dir = resolve(AGAINST);
  if (!existsSync(join(dir, 'bench', 'dshield.ts'))) fail(`DSHIELD_BENCH_GAPS_AGAINST: no bench/dshield.ts in ${dir}`);
  allSystems.push(['against', `dshield ${commitOf(dir)} (${dir})`, async () => ((await import(pathToFileURL(join(dir, 'bench', 'dshield.ts')).href)) as { dshieldTun: typeof dshieldTun }).dshieldTun('udp', CIPHER)]);
}
const unknown = [...WANTED].filter((key) => !['relay', 'dshield', 'openvpn', 'against'].includes(key));
if (unknown.length > 0) fail(`DSHIELD_BENCH_GAPS_SYSTEMS: unknown ${unknown.join(', ')} (relay, dshield, openvpn, against)`);
const systems: Array<[name: string, spec: SystemSpec]> = await Promise.all(allSystems.filter(([key]) => WANTED.has(key)).map(async ([, name, spec]) => [name, await spec()] as [string, SystemSpec]));
if (systems.length === 0) fail('DSHIELD_BENCH_GAPS_SYSTEMS names no system to run');

/** The commit checked out at `dir`, with a + when its tree has changes, for telling an A/B's two sides apart. */
function commitOf(dir: string): string {
  const head = spawnSync('git', ['-C', dir, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' });
  if (head.status !== 0) return '(not a git checkout)';
  const dirty = spawnSync('git', ['-C', dir, 'status', '--porcelain', '--untracked-files=no'], { encoding: 'utf8' }).stdout.trim() !== '';
  return `${head.stdout.trim()}${dirty ? '+' : ''}`;
}
const missing = ['perf', 'ping', 'iperf3', 'ip', 'nft', ...systems.flatMap(([, s]) => s.needs)].filter((tool) => !hasTool(tool));
if (missing.length > 0) fail(`missing ${[...new Set(missing)].join(', ')} (perf: apt-get install linux-perf; the rest: \`npm run bench\` installs them)`);

/** perf recording the syscalls of one process into a file, until stopped. */
interface Recording {
  /** Stop perf (SIGINT, then SIGKILL after PERF_STOP_MS) and return the recording as `perf script` prints it. */
  stop(): Promise<string>;
}

function record(pid: number, file: string): Recording {
  const perf = spawn('perf', ['record', '-q', '-e', 'raw_syscalls:sys_enter', '-e', 'raw_syscalls:sys_exit', '-p', String(pid), '-o', file], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => {
    perf.once('exit', () => resolve());
    perf.once('error', () => resolve());
  });
  return {
    async stop() {
      perf.kill('SIGINT');
      const stopped = await Promise.race([exited.then(() => true), sleep(PERF_STOP_MS).then(() => false)]);
      if (!stopped) {
        perf.kill('SIGKILL');
        throw new Error(`perf did not stop within ${PERF_STOP_MS / 1000} s`);
      }
      const script = spawnSync('perf', ['script', '-i', file, '-F', 'tid,time,event,trace'], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024, timeout: 60_000 });
      if (script.status !== 0) throw new Error(`perf script: ${(script.stderr || 'no output').trim().split('\n')[0]}`);
      return script.stdout;
    },
  };
}

interface Round {
  ping: number;
  /** The packet thread of the tunnel's server, then of its client. */
  threads: ThreadSteps[];
}
const results = new Map<string, Round[]>(systems.map(([name]) => [name, []]));
const work = mkdtempSync(join(tmpdir(), 'dshield-syscall-gaps-'));
try {
  await runSitting({
    systems,
    rounds: ROUNDS,
    workPrefix: 'dshield-syscall-gaps-sys-',
    async measure(name, running, bt, round) {
      if (running.pids.length !== 2) throw new Error(`${name}: expected a server and a client process, got ${running.pids.length}`);
      const recordings = running.pids.map((pid, i) => record(pid, join(work, `${round}-${i}.data`)));
      let ping: number;
      let scripts: PromiseSettledResult<string>[] = [];
      try {
        await sleep(PERF_ATTACH_MS);
        ping = await pingRtt(bt, PINGS);
      } finally {
        // Stopped whatever happened to the pings; an error of theirs wins over perf's.
        scripts = await Promise.allSettled(recordings.map((r) => r.stop()));
      }
      const threads = scripts.map((s, i) => {
        const side = i === 0 ? 'server' : 'client';
        if (s.status === 'rejected') throw new Error(`${name}, ${side}: ${s.reason instanceof Error ? s.reason.message : String(s.reason)}`);
        const t = busiestThreadSteps(s.value);
        if (t === undefined) throw new Error(`${name}: perf recorded no syscalls of the ${side}`);
        return t;
      });
      results.get(name)!.push({ ping, threads });
      const own = threads.map((t) => (t.ownUs / PINGS).toFixed(0)).join(' + ');
      const kernel = threads.map((t) => (t.kernelUs / PINGS).toFixed(0)).join(' + ');
      console.log(`round ${round + 1}/${ROUNDS} ${name.padEnd(20)} ping ${ping.toFixed(3)} ms; µs a ping, server + client: own code ${own}, in syscalls ${kernel}`);
    },
  });
} catch (err) {
  fail(err instanceof Error ? err.message : String(err));
} finally {
  rmSync(work, { recursive: true, force: true });
}

const perPing = (rounds: Round[], side: number, pick: (t: ThreadSteps) => number): string => median(rounds.map((r) => pick(r.threads[side]!) / PINGS)).toFixed(0);
console.log(`\n${CIPHER}, ${ROUNDS} round(s) of ${PINGS} pings 10 ms apart, under perf; medians over rounds, µs a ping:`);
console.log('| system | ping (ms) | server: own code | server: in syscalls | client: own code | client: in syscalls |');
console.log('|---|---|---|---|---|---|');
for (const [name] of systems) {
  const rounds = results.get(name)!;
  const cells = [0, 1].flatMap((side) => [perPing(rounds, side, (t) => t.ownUs), perPing(rounds, side, (t) => t.kernelUs)]);
  console.log(`| ${name} | ${median(rounds.map((r) => r.ping)).toFixed(3)} | ${cells.join(' | ')} |`);
}
console.log('\nSteps of the packet thread (median µs of each, over all rounds; the steps a ping takes once each):');
for (const [side, label] of ['server', 'client'].entries()) {
  const names = new Set<string>();
  for (const [name] of systems) for (const r of results.get(name)!) for (const [step, gaps] of r.threads[side]!.steps) if (gaps.length >= STEP_OF_A_PING) names.add(step);
  console.log(`\n${label}:`);
  console.log(`| step | ${systems.map(([name]) => name).join(' | ')} |`);
  console.log(`|---|${systems.map(() => '---').join('|')}|`);
  for (const step of [...names].sort()) {
    const cells = systems.map(([name]) => {
      const gaps = results.get(name)!.flatMap((r) => r.threads[side]!.steps.get(step) ?? []);
      return gaps.length >= STEP_OF_A_PING * ROUNDS ? median(gaps).toFixed(0) : '—';
    });
    console.log(`| ${step} | ${cells.join(' | ')} |`);
  }
}
