/**
 * `npm run bench` (never run by CI; needs root, Linux, /dev/net/tun):
 * dshield against WireGuard (wireguard-go), OpenVPN and shadowsocks-libev,
 * each beside a plain-forwarding baseline, all in one run on one machine, in
 * three network namespaces this run creates and always removes:
 *
 *   client ── server ── web      (veth pairs; the web host logs every request's source)
 *
 *   TUN mode    iperf3 TCP 1 and 4 streams both ways, UDP 1400-byte pps at < 1 % loss,
 *               ping RTT, 200 sequential 1 KiB requests; the relay-hop floor
 *               (one UDP echo hop in C and in Node: bench/hop-floor.ts)
 *   proxy mode  curl download/upload through SOCKS5, 200 sequential 1 KiB requests
 *   scale       idle streams (memory per stream), 1,000 active streams (p99), handshakes/s
 *
 * Median of DSHIELD_BENCH_RUNS (default 3) runs; DSHIELD_BENCH_QUICK=1 for a
 * short run (see bench/settings.ts for every knob). Only ratios from the same
 * run mean anything on a shared machine: the load average is recorded.
 * Writes bench/results/results.{json,md,svg} (quick.* in quick mode).
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { canRunNetns } from '../test/helpers/netns.ts';
import { NotAvailable, dshieldProxy, dshieldTun } from './dshield.ts';
import { ensureLibsodium, ensureTools } from './install.ts';
import { hasTool } from '../test/helpers/netns.ts';
import { curlDownload, curlUpload, iperfTcp, pingRtt, sequentialRequests, udpSearch } from './measure.ts';
import * as peers from './peers.ts';
import type { Running, SystemSpec } from './peers.ts';
import { StealMeter, withCpu } from './proc.ts';
import { computeRatios, consoleTable, evaluateTargets, finish, markdownTable, svgChart, writeResults, type Row } from './report.ts';
import { runHopFloor } from './hop-floor.ts';
import { runScale } from './scale.ts';
import { OUT_DIR, QUICK, RUNS, SECTIONS, SETTINGS, NO_INSTALL, wanted } from './settings.ts';
import { createBenchTopology, type BenchTopology } from './topology.ts';

const CIPHERS = ['chacha20-poly1305', 'aes-256-gcm'] as const;
/** results.{json,md,svg} for a full run of every section; quick-… and -<sections> mark the others. */
const OUT_NAME = `${QUICK ? 'quick' : 'results'}${['tun', 'proxy', 'scale'].every((s) => SECTIONS.has(s)) ? '' : `-${[...SECTIONS].join('-')}`}`;

const TUN_SYSTEMS: SystemSpec[] = [
  peers.plainForwarding,
  peers.wireguardGo,
  peers.openvpnAes,
  peers.openvpnChacha,
  ...(['udp', 'tcp', 'ws'] as const).flatMap((t) => CIPHERS.map((c) => dshieldTun(t, c))),
];
const PROXY_SYSTEMS: SystemSpec[] = [
  peers.plainDirect,
  peers.microsocks,
  peers.shadowsocksChacha,
  peers.shadowsocksAes,
  ...(['tcp', 'ws'] as const).flatMap((t) => CIPHERS.map((c) => dshieldProxy(t, c))),
];

interface MetricDef {
  metric: string;
  label: string;
  unit: string;
  better: 'higher' | 'lower';
  additive?: boolean;
}
const TUN_METRICS: MetricDef[] = [
  { metric: 'tcp1-up', label: 'TCP 1 stream client→web', unit: 'Mbit/s', better: 'higher' },
  { metric: 'tcp1-down', label: 'TCP 1 stream web→client (-R)', unit: 'Mbit/s', better: 'higher' },
  { metric: 'tcp4-up', label: 'TCP 4 streams client→web', unit: 'Mbit/s', better: 'higher' },
  { metric: 'tcp4-down', label: 'TCP 4 streams web→client (-R)', unit: 'Mbit/s', better: 'higher' },
  { metric: 'udp-pps', label: 'UDP 1400 B at < 1 % loss', unit: 'kpps', better: 'higher' },
  { metric: 'ping', label: 'ping RTT', unit: 'ms', better: 'lower', additive: true },
  { metric: 'requests', label: `${SETTINGS.requests} × 1 KiB requests (new conn each)`, unit: 'ms/req', better: 'lower', additive: true },
];
const MiB = SETTINGS.proxyBytes / 1024 / 1024;
const size = MiB >= 1024 ? `${MiB / 1024} GiB` : `${MiB} MiB`;
const PROXY_METRICS: MetricDef[] = [
  { metric: 'download', label: `${size} download (curl)`, unit: 'MB/s', better: 'higher' },
  { metric: 'upload', label: `${size} upload (curl)`, unit: 'MB/s', better: 'higher' },
  { metric: 'requests', label: `${SETTINGS.requests} × 1 KiB requests (new conn each)`, unit: 'ms/req', better: 'lower', additive: true },
];

function emptyRows(spec: SystemSpec, defs: MetricDef[], status: Row['status'], reason?: string): Row[] {
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

/** Per metric: the run values and the CPU seconds / bytes of the system's processes. */
class Collector {
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

async function measureTun(bt: BenchTopology, sys: Running, c: Collector, marker: string): Promise<void> {
  const S = SETTINGS;
  for (let run = 0; run < RUNS; run++) {
    for (const [metric, streams, reverse] of [
      ['tcp1-up', 1, false],
      ['tcp1-down', 1, true],
      ['tcp4-up', 4, false],
      ['tcp4-down', 4, true],
    ] as const) {
      const { value, cpu } = await withCpu(sys.pids, () => iperfTcp(bt, { streams, reverse, seconds: S.tcpSeconds }));
      c.add(metric, value.bps / 1e6, sys.pids.length ? { cpu, bytes: value.bytes } : undefined);
    }
    const udp = await withCpu(sys.pids, () => udpSearch(bt, S.udpSeconds, S.udpSteps));
    c.add('udp-pps', udp.value.pps / 1000, sys.pids.length ? { cpu: udp.cpu, bytes: udp.value.bytes } : undefined, udp.value.steps);
    c.add('ping', await pingRtt(bt, S.pings));
    c.add('requests', await sequentialRequests(bt, S.requests, `${marker}&run=${run}`, []));
  }
}

async function measureProxy(bt: BenchTopology, sys: Running, c: Collector, marker: string, uploadFile: string): Promise<void> {
  const proxy = sys.curlProxy ?? [];
  for (let run = 0; run < RUNS; run++) {
    const down = await withCpu(sys.pids, () => curlDownload(bt, SETTINGS.proxyBytes, `${marker}&run=${run}`, proxy));
    c.add('download', down.value.bps / 8e6, sys.pids.length ? { cpu: down.cpu, bytes: down.value.bytes } : undefined);
    const up = await withCpu(sys.pids, () => curlUpload(bt, uploadFile, SETTINGS.proxyBytes, `${marker}&run=${run}`, proxy));
    c.add('upload', up.value.bps / 8e6, sys.pids.length ? { cpu: up.cpu, bytes: up.value.bytes } : undefined);
    c.add('requests', await sequentialRequests(bt, SETTINGS.requests, `${marker}&run=${run}`, proxy));
  }
}

async function runSystem(bt: BenchTopology, spec: SystemSpec, defs: MetricDef[], measure: (sys: Running, c: Collector, marker: string) => Promise<void>): Promise<Row[]> {
  const missing = spec.needs.filter((t) => !hasTool(t));
  if (missing.length) {
    console.log(`  ${spec.id}: skipped (${missing.join(', ')} not installed)`);
    return emptyRows(spec, defs, 'skipped', `${missing.join(', ')} not installed`);
  }
  const work = mkdtempSync(join(tmpdir(), 'dshield-bench-'));
  let sys: Running | undefined;
  const t0 = Date.now();
  try {
    try {
      sys = await spec.start(bt, work);
    } catch (err) {
      const why = (err as Error).message.split('\n')[0]!;
      const status = err instanceof NotAvailable ? 'not available yet' : 'failed';
      console.log(`  ${spec.id}: ${status} — ${why}`);
      return emptyRows(spec, defs, status, why);
    }
    const marker = `sys=${encodeURIComponent(spec.id)}`;
    const c = new Collector();
    const steal = new StealMeter();
    try {
      await measure(sys, c, marker);
    } catch (err) {
      const why = (err as Error).message.split('\n')[0]!;
      console.log(`  ${spec.id}: failed while measuring — ${why}`);
      return emptyRows(spec, defs, 'failed', why);
    }
    // Proof of path: every small request of this system reached the web host from the expected address.
    const expected = spec.expectSource === 'server' ? bt.topo.addr.serverWebSide : bt.topo.addr.client;
    const sources = [...new Set(bt.sourcesOf(marker))];
    if (sources.length !== 1 || sources[0] !== expected) {
      const why = `the web host saw requests from ${sources.join(', ') || 'nowhere'}, expected only ${expected}: traffic did not take the system's path`;
      console.log(`  ${spec.id}: failed — ${why}`);
      return emptyRows(spec, defs, 'failed', why);
    }
    const stealPercent = steal.percent();
    const rows = defs.map((d): Row => {
      const cpu = c.cpu.get(d.metric);
      return finish({
        ...emptyRows(spec, [d], 'ok')[0]!,
        runs: c.values.get(d.metric) ?? [],
        cpuSecPerGB: cpu && cpu.bytes > 0 ? cpu.cpu / (cpu.bytes / 1e9) : undefined,
        stealPercent,
        extra: { source: expected, notes: sys!.notes, ...(c.extra.has(d.metric) ? { detail: c.extra.get(d.metric) } : {}) },
      });
    });
    console.log(`  ${spec.id}: ${rows.map((r) => `${r.metric} ${r.median?.toFixed(2)}`).join(', ')} (${((Date.now() - t0) / 1000).toFixed(0)} s, CPU steal ${stealPercent.toFixed(1)} %; web host saw ${expected})`);
    return rows;
  } finally {
    await sys?.stop().catch(() => {});
    rmSync(work, { recursive: true, force: true });
  }
}

function load(): number[] {
  return loadavg().map((l) => Number(l.toFixed(2)));
}

async function main(): Promise<void> {
  const why = canRunNetns(['ip', 'nft', 'ping']);
  if (why) {
    console.log(`bench: cannot run: ${why}`);
    process.exit(2);
  }
  const started = new Date();
  const loads: Array<{ at: string; load: number[] }> = [{ at: 'start', load: load() }];
  console.log(`dshield bench: ${QUICK ? 'QUICK' : 'full'} mode, ${RUNS} runs per measurement, sections ${[...SECTIONS].join(',')}; load average ${load().join(' ')}`);
  const toolNeeds = ['iperf3', 'curl', 'openssl', 'taskset', ...(SECTIONS.has('tun') && wanted('hop/floor') ? ['socat'] : []), ...new Set([...TUN_SYSTEMS, ...PROXY_SYSTEMS].filter((s) => wanted(s.id)).flatMap((s) => s.needs))];
  const problems = [...(await ensureTools(toolNeeds, NO_INSTALL)), ...(await ensureLibsodium(NO_INSTALL))];
  for (const p of problems) console.log(`  ${p}`);
  for (const t of ['iperf3', 'curl']) {
    if (!hasTool(t)) {
      console.log(`bench: cannot run without ${t}`);
      process.exit(2);
    }
  }

  const rows: Row[] = [];
  const bt = await createBenchTopology();
  const uploadDir = mkdtempSync(join(tmpdir(), 'dshield-bench-upload-'));
  try {
    console.log(`topology ${bt.topo.id}: client ${bt.topo.ns.client}, server ${bt.topo.ns.server}, web ${bt.topo.ns.web}`);
    if (SECTIONS.has('tun')) {
      console.log('TUN mode:');
      for (const spec of TUN_SYSTEMS.filter((s) => wanted(s.id))) rows.push(...(await runSystem(bt, spec, TUN_METRICS, (sys, c, m) => measureTun(bt, sys, c, m))));
      if (wanted('hop/floor')) rows.push(...(await runHopFloor(bt)));
      loads.push({ at: 'after tun', load: load() });
    }
    if (SECTIONS.has('proxy')) {
      console.log('proxy mode:');
      const uploadFile = join(uploadDir, 'upload.bin');
      const fd = openSync(uploadFile, 'w');
      const chunk = Buffer.alloc(1024 * 1024, 'u');
      for (let i = 0; i < SETTINGS.proxyBytes / chunk.length; i++) writeSync(fd, chunk);
      closeSync(fd);
      for (const spec of PROXY_SYSTEMS.filter((s) => wanted(s.id))) rows.push(...(await runSystem(bt, spec, PROXY_METRICS, (sys, c, m) => measureProxy(bt, sys, c, m, uploadFile))));
      loads.push({ at: 'after proxy', load: load() });
    }
    if (SECTIONS.has('scale')) {
      console.log('scale (dshield SOCKS5 over tcp, chacha20-poly1305):');
      rows.push(...(await runScale(bt)));
      loads.push({ at: 'after scale', load: load() });
    }
  } finally {
    bt.cleanup();
    rmSync(uploadDir, { recursive: true, force: true });
  }

  computeRatios(rows);
  const targets = evaluateTargets(rows);
  const table = consoleTable(rows);
  console.log(`\n${table}\n`);
  for (const t of targets) console.log(`${t.verdict.padEnd(12)} ${t.text}: ${t.detail}`);

  const meta = {
    date: started.toISOString(),
    durationSeconds: Math.round((Date.now() - started.getTime()) / 1000),
    quick: QUICK,
    runs: RUNS,
    settings: SETTINGS,
    node: process.version,
    kernel: execFileSync('uname', ['-r']).toString().trim(),
    cpu: `${cpus().length} × ${cpus()[0]?.model ?? '?'}`,
    loadAverage: loads,
    installProblems: problems,
    notes: [
      'CPU s/GB sums utime+stime of the system\'s own processes (/proc/PID/stat) over the bytes the receiver got; kernel work in softirq (forwarding, veth, TUN queues, NAT) is attributed to no process, so it is not counted for anyone, and the plain baseline shows none.',
      'Each system is set up, measured RUNS times, and torn down before the next; the machine is shared, so compare ratios within this run.',
      'The web host logs the source address of every request: tunnel and proxy rows are kept only if all their requests came from the server namespace (the baseline: from the client).',
      'CPU steal is the share of the machine\'s CPU time (all CPUs, /proc/stat) that the hypervisor gave to other guests while the system was measured: on a shared VM, a row measured under a few percent of steal can come out slower for that alone, latency rows most (a lone packet waits for a CPU the hypervisor took).',
    ],
  };
  const svg = svgChart(`dshield bench ${meta.date.slice(0, 10)} (${QUICK ? 'quick' : 'full'}, median of ${RUNS}; whiskers min–max)`, [
    { title: 'TUN mode: iperf3 TCP, 1 stream, client→web (Mbit/s)', unit: 'Mbit/s', rows: rows.filter((r) => r.section === 'tun' && r.metric === 'tcp1-up') },
    { title: 'TUN mode: iperf3 TCP, 1 stream, web→client (Mbit/s)', unit: 'Mbit/s', rows: rows.filter((r) => r.section === 'tun' && r.metric === 'tcp1-down') },
    { title: `Proxy mode: ${size} download through SOCKS5 (MB/s)`, unit: 'MB/s', rows: rows.filter((r) => r.section === 'proxy' && r.metric === 'download') },
    { title: `Proxy mode: ${size} upload through SOCKS5 (MB/s)`, unit: 'MB/s', rows: rows.filter((r) => r.section === 'proxy' && r.metric === 'upload') },
  ]);
  const md = [
    `# dshield benchmark results`,
    '',
    `${meta.date} · ${meta.quick ? 'quick mode' : 'full mode'} · median of ${RUNS} runs · Node ${meta.node} · kernel ${meta.kernel} · ${meta.cpu}`,
    '',
    `Load average (1/5/15 min): ${loads.map((l) => `${l.at} ${l.load.join(' ')}`).join('; ')}. The machine is shared: compare ratios, not absolute numbers.`,
    '',
    `![throughput by system](${OUT_NAME}.svg)`,
    '',
    markdownTable(rows),
    '',
    '## Targets (issue 4), from this run',
    '',
    ...targets.map((t) => `- **${t.verdict}** ${t.text}: ${t.detail}`),
    '',
    '## Notes',
    '',
    ...meta.notes.map((n) => `- ${n}`),
    ...problems.map((p) => `- install: ${p}`),
    '',
  ].join('\n');
  const json = JSON.stringify({ ...meta, rows, targets }, null, 2) + '\n';
  writeResults(OUT_DIR, { [`${OUT_NAME}.json`]: json, [`${OUT_NAME}.md`]: md, [`${OUT_NAME}.svg`]: svg });
  console.log(`\nwritten: ${join(OUT_DIR, OUT_NAME)}.json, .md, .svg (${meta.durationSeconds} s)`);
}

await main();
