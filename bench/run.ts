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
 * Median of DSHIELD_BENCH_RUNS (default 3) runs, the systems of a section
 * taking turns, so their runs share the same stretches of the machine
 * (bench/turns.ts); DSHIELD_BENCH_QUICK=1 for a short run (see
 * bench/settings.ts for every knob). Only ratios from the same
 * run mean anything on a shared machine: the load average is recorded.
 * Writes bench/results/results.{json,md,svg} (quick.* in quick mode).
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { canRunNetns } from '../test/helpers/netns.ts';
import { dshieldProxy, dshieldTun } from './dshield.ts';
import { runInTurns, type Collector, type MetricDef } from './turns.ts';
import { ensureLibsodium, ensureTools } from './install.ts';
import { hasTool } from '../test/helpers/netns.ts';
import { curlDownload, curlUpload, iperfTcp, pingRtt, sequentialRequests, udpSearch, warmUpTunnel } from './measure.ts';
import * as peers from './peers.ts';
import type { Running, SystemSpec } from './peers.ts';
import { withCpu } from './proc.ts';
import { computeRatios, consoleTable, evaluateTargets, markdownTable, svgChart, writeResults, type Row } from './report.ts';
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

/** One run of the TUN measurements, in this order: TCP, the UDP rate search, then the lone packets (ping, requests). */
async function measureTunRun(bt: BenchTopology, sys: Running, c: Collector, marker: string, run: number): Promise<void> {
  const S = SETTINGS;
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

/**
 * What each proxy system carries before its first run, not counted: a
 * process's first transfer also compiles its path (V8's optimizing compiler
 * runs on threads of the same process), which a proxy that runs for hours
 * pays once. Every system gets it, whether it needs it or not.
 */
async function warmUpProxy(bt: BenchTopology, sys: Running, warmUpFile: string): Promise<void> {
  const proxy = sys.curlProxy ?? [];
  await curlDownload(bt, PROXY_WARM_UP_BYTES, 'warm-up', proxy);
  await curlUpload(bt, warmUpFile, PROXY_WARM_UP_BYTES, 'warm-up', proxy);
}
const PROXY_WARM_UP_BYTES = 64 * 1024 * 1024;

/** A file of `bytes` to upload. */
function uploadFileOf(path: string, bytes: number): string {
  const fd = openSync(path, 'w');
  const chunk = Buffer.alloc(1024 * 1024, 'u');
  for (let i = 0; i < bytes / chunk.length; i++) writeSync(fd, chunk);
  closeSync(fd);
  return path;
}

/** One run of the proxy measurements: a download, an upload, and the sequential requests. */
async function measureProxyRun(bt: BenchTopology, sys: Running, c: Collector, marker: string, uploadFile: string, run: number): Promise<void> {
  const proxy = sys.curlProxy ?? [];
  const down = await withCpu(sys.pids, () => curlDownload(bt, SETTINGS.proxyBytes, `${marker}&run=${run}`, proxy));
  c.add('download', down.value.bps / 8e6, sys.pids.length ? { cpu: down.cpu, bytes: down.value.bytes } : undefined);
  const up = await withCpu(sys.pids, () => curlUpload(bt, uploadFile, SETTINGS.proxyBytes, `${marker}&run=${run}`, proxy));
  c.add('upload', up.value.bps / 8e6, sys.pids.length ? { cpu: up.cpu, bytes: up.value.bytes } : undefined);
  c.add('requests', await sequentialRequests(bt, SETTINGS.requests, `${marker}&run=${run}`, proxy));
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
      rows.push(
        ...(await runInTurns(bt, {
          specs: TUN_SYSTEMS.filter((s) => wanted(s.id)),
          defs: TUN_METRICS,
          runs: RUNS,
          sideBySide: false,
          warmUp: (_sys, spec) => warmUpTunnel(bt, spec.role === 'baseline'),
          run: (sys, c, marker, run) => measureTunRun(bt, sys, c, marker, run),
        })),
      );
      if (wanted('hop/floor')) rows.push(...(await runHopFloor(bt)));
      loads.push({ at: 'after tun', load: load() });
    }
    if (SECTIONS.has('proxy')) {
      console.log('proxy mode:');
      const uploadFile = uploadFileOf(join(uploadDir, 'upload.bin'), SETTINGS.proxyBytes);
      const warmUpFile = uploadFileOf(join(uploadDir, 'warm-up.bin'), PROXY_WARM_UP_BYTES);
      rows.push(
        ...(await runInTurns(bt, {
          specs: PROXY_SYSTEMS.filter((s) => wanted(s.id)),
          defs: PROXY_METRICS,
          runs: RUNS,
          sideBySide: true,
          warmUp: (sys) => warmUpProxy(bt, sys, warmUpFile),
          run: (sys, c, marker, run) => measureProxyRun(bt, sys, c, marker, uploadFile, run),
        })),
      );
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
      'The systems of a section take turns (bench/turns.ts): run 1 of each, then run 2 of each in the opposite order, and so on, so every system\'s runs are spread over the same stretch of this shared machine. In TUN mode each system is started for its turn and stopped after it (their tunnels would take the same routes); in proxy mode all are up at once, each on its own ports. After every start a system is warmed up, not counted (TUN: 2 s of iperf3 and 50 pings; proxy: 64 MiB each way): a process\'s first traffic also compiles its path. Compare ratios within this run.',
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
