/**
 * Scale of one dshield session (SOCKS5 over tcp, chacha20-poly1305, real CLI
 * processes), driven by bench/drivers/*.ts in the client namespace:
 *
 *   idle streams   N streams held open to a silent server: resident memory
 *                  per stream of the server and the client process (RSS delta / N)
 *   active streams 1,000 streams each doing 1 KiB echo round trips, twice:
 *                  saturated (10–30 ms pauses: aggregate throughput, and the
 *                  p99 there), then paced (150–250 ms pauses, ~5,000 requests/s
 *                  offered: p50/p99 latency and the fewest round trips any
 *                  stream got, 0 = starved). Latency is judged paced because
 *                  at saturation the driver itself is the bottleneck: even
 *                  microsocks (no crypto, measured the same way for
 *                  reference) shows a p99 over 150 ms there.
 *   handshakes     a server pinned to CPU 0, a driver pinned to CPU 1 doing
 *                  full Noise IK handshakes, over tcp (a new connection each)
 *                  and over udp (a new client socket each): completed
 *                  handshakes per second of the server's CPU time (what one
 *                  core sustains), and per wall-clock second; the server's
 *                  first, uncounted run warms its compiled code, so the runs
 *                  measure a server in steady state. The udp server's
 *                  handshake rate limits are lifted: they bound what forged
 *                  initiations may cost, and here they would cap the measure
 */
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ROOT } from '../test/helpers/cli.ts';
import { clientConfig, dshieldProxy, newKeys, serverConfig, startCliIn, type DshieldConfigOptions } from './dshield.ts';
import { microsocks, type Running, type SystemSpec } from './peers.ts';
import { StealMeter, cpuSeconds, rssBytes, startIn } from './proc.ts';
import { finish, type Row } from './report.ts';
import { PORTS, RUNS, SETTINGS } from './settings.ts';
import type { BenchTopology } from './topology.ts';

const TSX = import.meta.resolve('tsx');
const STREAMS = fileURLToPath(new URL('./drivers/streams.ts', import.meta.url));
const HANDSHAKES = fileURLToPath(new URL('./drivers/handshakes.ts', import.meta.url));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A scale row's system. modeLabel fills the mode column: SOCKS5 unless said (the handshake test has no proxy). */
type ScaleSpec = { id: string; system: string; cipher: string; role: Row['role']; modeLabel?: string };

function row(spec: ScaleSpec, metric: string, label: string, unit: string, better: Row['better'], runs: number[], extra?: Record<string, unknown>): Row {
  return finish({ section: 'scale', id: spec.id, system: spec.system, mode: spec.modeLabel ?? 'SOCKS5', cipher: spec.cipher, role: spec.role, metric, label, unit, better, runs, status: 'ok', extra });
}

function failedRows(spec: ScaleSpec, metrics: Array<[string, string, string, Row['better']]>, why: string, status: Row['status'] = 'failed'): Row[] {
  return metrics.map(([metric, label, unit, better]) => ({ section: 'scale', id: spec.id, system: spec.system, mode: spec.modeLabel ?? 'SOCKS5', cipher: spec.cipher, role: spec.role, metric, label, unit, better, runs: [], status, reason: why }));
}

function driver(bt: BenchTopology, args: string[]) {
  return startIn(bt.topo.ns.client, 'streams-driver', process.execPath, ['--import', TSX, STREAMS, ...args], { cwd: ROOT });
}

async function withSystem<T>(bt: BenchTopology, spec: SystemSpec, fn: (sys: Running) => Promise<T>): Promise<T> {
  const work = mkdtempSync(join(tmpdir(), 'dshield-bench-scale-'));
  let sys: Running | undefined;
  try {
    sys = await spec.start(bt, work);
    return await fn(sys);
  } finally {
    await sys?.stop().catch(() => {});
    rmSync(work, { recursive: true, force: true });
  }
}

async function idleStreams(bt: BenchTopology): Promise<Row[]> {
  const spec = dshieldProxy('tcp', 'chacha20-poly1305');
  const n = SETTINGS.idleStreams;
  const server: number[] = [];
  const client: number[] = [];
  let opened = 0;
  for (let run = 0; run < RUNS; run++) {
    await withSystem(bt, spec, async (sys) => {
      const [sp, cp] = sys.pids as [number, number];
      await sleep(1000);
      const before = [rssBytes(sp), rssBytes(cp)];
      const d = driver(bt, ['idle', '127.0.0.1', String(PORTS.socks), bt.webIp, String(PORTS.idle), String(n)]);
      try {
        const m = await d.waitFor(/^OPENED (.*)$/m, 180_000);
        const r = JSON.parse(m[1]!) as { opened: number; failed: number; firstError?: string };
        if (r.opened < n * 0.99) throw new Error(`only ${r.opened} of ${n} idle streams opened (${r.failed} failed: ${r.firstError})`);
        opened = r.opened;
        await sleep(3000);
        server.push((rssBytes(sp) - before[0]!) / r.opened / 1024);
        client.push((rssBytes(cp) - before[1]!) / r.opened / 1024);
      } finally {
        await d.stop();
      }
    });
  }
  console.log(`  idle: ${opened} streams, server ${server.map((v) => v.toFixed(1)).join('/')} KiB/stream, client ${client.map((v) => v.toFixed(1)).join('/')} KiB/stream`);
  return [
    row(spec, 'idle-server-mem', `server RSS per idle stream (${n} streams)`, 'KiB', 'lower', server, { streams: opened }),
    row(spec, 'idle-client-mem', `client RSS per idle stream (${n} streams)`, 'KiB', 'lower', client, { streams: opened }),
  ];
}

/** Pauses between a stream's requests: as fast as it goes, and a fixed offered load (~1,000 / 0.2 s). */
const SATURATED_PAUSE_MS: [number, number] = [10, 30];
const PACED_PAUSE_MS: [number, number] = [150, 250];

async function activeStreams(bt: BenchTopology, spec: SystemSpec): Promise<Row[]> {
  const n = SETTINGS.activeStreams;
  const tput: number[] = [];
  const p99Saturated: number[] = [];
  const p99: number[] = [];
  const p50: number[] = [];
  let minPerStream = Infinity;
  type Result = { streams: number; failed: number; firstError?: string; seconds: number; bytes: number; p50: number; p99: number; minPerStream: number };
  await withSystem(bt, spec, async (sys) => {
    const [host, port] = sys.socks!.split(':') as [string, string];
    const load = async (pause: [number, number]): Promise<Result> => {
      const d = driver(bt, ['active', host, port, bt.webIp, String(PORTS.echo), String(n), String(SETTINGS.activeSeconds), String(pause[0]), String(pause[1])]);
      try {
        const m = await d.waitFor(/^RESULT (.*)$/m, SETTINGS.activeSeconds * 1000 + 120_000);
        const r = JSON.parse(m[1]!) as Result;
        if (r.streams < n) throw new Error(`only ${r.streams} of ${n} active streams opened (${r.failed} failed: ${r.firstError})`);
        return r;
      } finally {
        await d.stop();
      }
    };
    for (let run = 0; run < RUNS; run++) {
      const saturated = await load(SATURATED_PAUSE_MS);
      tput.push(saturated.bytes / saturated.seconds / 1e6);
      p99Saturated.push(saturated.p99);
      const paced = await load(PACED_PAUSE_MS);
      p99.push(paced.p99);
      p50.push(paced.p50);
      minPerStream = Math.min(minPerStream, paced.minPerStream);
    }
  });
  console.log(
    `  active ${spec.id}: saturated ${tput.map((v) => v.toFixed(1)).join('/')} MB/s (p99 ${p99Saturated.map((v) => v.toFixed(0)).join('/')} ms); ` +
      `paced p99 ${p99.map((v) => v.toFixed(1)).join('/')} ms, fewest per stream ${minPerStream}`,
  );
  const extra = { streams: n, minPerStream };
  return [
    row(spec, 'active-throughput', `${n} active streams, saturated: 1 KiB echo throughput`, 'MB/s', 'higher', tput, extra),
    row(spec, 'active-p99-saturated', `${n} active streams, saturated: p99 of a 1 KiB round trip`, 'ms', 'lower', p99Saturated, extra),
    row(spec, 'active-p50', `${n} active streams, paced (~5k req/s): p50 of a 1 KiB round trip`, 'ms', 'lower', p50, extra),
    row(spec, 'active-p99', `${n} active streams, paced (~5k req/s): p99 of a 1 KiB round trip`, 'ms', 'lower', p99, extra),
  ];
}

/** The handshake test's server, one per transport. */
function handshakeSpec(transport: HandshakeTransport) {
  return { id: `dshield-handshakes/${transport}/chacha20-poly1305`, system: `dshield server (${transport})`, modeLabel: 'handshake', cipher: 'chacha20-poly1305', role: 'dshield' as const };
}
type HandshakeTransport = 'tcp' | 'udp';
/** Above any rate the test reaches: server.handshakesPerSecond and handshakesPerSource for the udp server. */
const UNLIMITED_HANDSHAKES = 1_000_000;

async function handshakes(bt: BenchTopology, transport: HandshakeTransport): Promise<Row[]> {
  const spec = handshakeSpec(transport);
  const work = mkdtempSync(join(tmpdir(), 'dshield-bench-hs-'));
  const lanes = 32;
  const o: DshieldConfigOptions = {
    transport,
    cipher: 'chacha20-poly1305',
    serverIp: bt.topo.addr.serverClientSide,
    webSubnet: '10.200.2.0/24',
    webIp: bt.webIp,
    server: newKeys(),
    clients: Array.from({ length: lanes }, (_, i) => ({ name: `lane${i}`, keys: newKeys() })),
    tun: false,
    work,
  };
  const perCore: number[] = [];
  const observed: number[] = [];
  let warmupPerCore = 0;
  const base = serverConfig(o) as { server: Record<string, unknown> };
  const limits = transport === 'udp' ? { handshakesPerSecond: UNLIMITED_HANDSHAKES, handshakesPerSource: UNLIMITED_HANDSHAKES } : {};
  const server = startCliIn(bt.topo.ns.server, `dshield-server(handshakes, ${transport})`, 'server', join(work, 'server'), { ...base, server: { ...base.server, ...limits } }, '0');
  try {
    await server.waitFor(/listening on \S+/, 30_000);
    const config = join(work, 'client.config.json');
    writeFileSync(config, JSON.stringify(clientConfig(o, o.clients[0]!.keys)), { mode: 0o600 });
    const keys = join(work, 'keys.json');
    writeFileSync(keys, JSON.stringify(o.clients.map((c) => c.keys.privateKey)), { mode: 0o600 });
    /** One driver run of `seconds`: what it completed, and the server's CPU time meanwhile. */
    const drive = async (seconds: number) => {
      const cpu0 = cpuSeconds(server.pid);
      const d = startIn(bt.topo.ns.client, 'handshake-driver', 'taskset', ['-c', '1', process.execPath, '--import', TSX, HANDSHAKES, config, keys, String(seconds)], { cwd: ROOT });
      try {
        const m = await d.waitFor(/^RESULT (.*)$/m, seconds * 1000 + 60_000);
        const r = JSON.parse(m[1]!) as { handshakes: number; seconds: number; errors: number; firstError?: string };
        const cpu = cpuSeconds(server.pid) - cpu0;
        if (r.handshakes === 0) throw new Error(`no handshake completed (${r.errors} errors: ${r.firstError})`);
        return { ...r, cpu };
      } finally {
        await d.stop();
      }
    };
    const warm = await drive(SETTINGS.handshakeWarmupSeconds);
    warmupPerCore = warm.handshakes / warm.cpu;
    console.log(`  handshakes over ${transport}, warm-up (not counted): ${warm.handshakes} in ${warm.seconds.toFixed(1)} s, server CPU ${warm.cpu.toFixed(2)} s, ${warmupPerCore.toFixed(0)} per CPU-second`);
    for (let run = 0; run < RUNS; run++) {
      const r = await drive(SETTINGS.handshakeSeconds);
      perCore.push(r.handshakes / r.cpu);
      observed.push(r.handshakes / r.seconds);
      console.log(`  handshakes over ${transport}, run ${run + 1}: ${r.handshakes} in ${r.seconds.toFixed(1)} s, server CPU ${r.cpu.toFixed(2)} s, ${r.errors} errors`);
    }
  } finally {
    await server.stop();
    rmSync(work, { recursive: true, force: true });
  }
  return [
    row(spec, 'handshakes-per-core', 'handshakes per server CPU-second (server pinned to 1 core)', '/s', 'higher', perCore, { lanes, warmupSeconds: SETTINGS.handshakeWarmupSeconds, warmupPerCore: Math.round(warmupPerCore) }),
    row(spec, 'handshakes-observed', `handshakes per wall second (driver on the other core, ${lanes} lanes)`, '/s', 'higher', observed, { lanes }),
  ];
}

export async function runScale(bt: BenchTopology): Promise<Row[]> {
  const rows: Row[] = [];
  const dsh = dshieldProxy('tcp', 'chacha20-poly1305');
  const attempt = async (spec: ScaleSpec, metrics: Array<[string, string, string, Row['better']]>, fn: () => Promise<Row[]>) => {
    try {
      const steal = new StealMeter();
      const measured = await fn();
      const stealPercent = steal.percent();
      rows.push(...measured.map((row) => ({ ...row, stealPercent })));
    } catch (err) {
      const why = (err as Error).message.split('\n')[0]!;
      console.log(`  ${spec.id} ${metrics.map((m) => m[0]).join('/')}: failed — ${why}`);
      rows.push(...failedRows(spec, metrics, why));
    }
  };
  await attempt(dsh, [['idle-server-mem', 'server RSS per idle stream', 'KiB', 'lower'], ['idle-client-mem', 'client RSS per idle stream', 'KiB', 'lower']], () => idleStreams(bt));
  const activeMetrics: Array<[string, string, string, Row['better']]> = [
    ['active-throughput', 'active streams: throughput', 'MB/s', 'higher'],
    ['active-p99-saturated', 'active streams: p99 saturated', 'ms', 'lower'],
    ['active-p50', 'active streams: p50', 'ms', 'lower'],
    ['active-p99', 'active streams: p99', 'ms', 'lower'],
  ];
  await attempt(microsocks, activeMetrics, () => activeStreams(bt, microsocks));
  await attempt(dsh, activeMetrics, () => activeStreams(bt, dsh));
  for (const transport of ['tcp', 'udp'] as const) {
    await attempt(handshakeSpec(transport), [['handshakes-per-core', 'handshakes per server CPU-second', '/s', 'higher'], ['handshakes-observed', 'handshakes per wall second', '/s', 'higher']], () => handshakes(bt, transport));
  }
  return rows;
}
