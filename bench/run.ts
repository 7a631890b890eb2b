/**
 * `npm run bench`: proxy-mode throughput and per-request latency on loopback,
 * each beside a plain baseline measured in the same run (this machine is
 * shared and noisy: only ratios from one run mean anything).
 *
 *   baseline   curl straight to a local HTTP server
 *   dshield    curl through the client's SOCKS5 proxy, tunnel over tcp / ws,
 *              with each cipher (real server and client processes)
 *
 * For each: download and upload of BENCH_MB (default 256) MiB, median of
 * BENCH_RUNS (default 3) runs, and 200 sequential 1 KiB requests; CPU seconds
 * of the dshield processes per GiB moved. Prints one table and writes
 * bench/results/proxy.json and .md. Never run by CI.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { startTunnel, type TunnelProcs } from '../test/helpers/tunnel.ts';
import { startWebServer, type WebServer } from '../test/helpers/web.ts';
import { stopAll, tempDir } from '../test/helpers/cli.ts';

const MB = Number(process.env.DSHIELD_BENCH_MB ?? 256);
const RUNS = Number(process.env.DSHIELD_BENCH_RUNS ?? 3);
const REQUESTS = 200;
const RESULTS = fileURLToPath(new URL('./results/', import.meta.url));

interface Row {
  system: string;
  cipher: string;
  metric: string;
  unit: string;
  runs: number[];
  median: number;
  ratio?: number;
  cpuSecPerGiB?: number;
}

function curlTimed(args: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    execFile('curl', ['-sS', '--fail', '--max-time', '600', '-o', '/dev/null', '-w', '%{time_total}', ...args], { timeout: 650_000 }, (err, out, errOut) =>
      err ? reject(new Error(errOut || err.message)) : resolve(Number(out)),
    );
  });
}

/** Seconds for REQUESTS sequential small requests (one curl process, reused connection for baseline too). */
async function requestsTimed(proxyArgs: string[], url: string): Promise<number> {
  const urls = Array.from({ length: REQUESTS }, () => url);
  const started = process.hrtime.bigint();
  await new Promise<void>((resolve, reject) =>
    execFile('curl', ['-sS', '--fail', '-o', '/dev/null', ...proxyArgs, ...urls], { timeout: 120_000 }, (err, _o, e) => (err ? reject(new Error(e || err.message)) : resolve())),
  );
  return Number(process.hrtime.bigint() - started) / 1e9;
}

function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime
  return ticks / 100;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function measure(
  system: string,
  cipher: string,
  proxyArgs: string[],
  web: WebServer,
  upload: string,
  pids: number[],
): Promise<Row[]> {
  const bytes = MB * 1024 * 1024;
  const down: number[] = [];
  const up: number[] = [];
  const cpuBefore = pids.reduce((n, p) => n + cpuSeconds(p), 0);
  for (let i = 0; i < RUNS; i++) {
    down.push(bytes / (await curlTimed([...proxyArgs, web.url('/download')])) / 1e6);
    up.push(bytes / (await curlTimed([...proxyArgs, '-T', upload, web.url('/upload')])) / 1e6);
  }
  const cpu = pids.reduce((n, p) => n + cpuSeconds(p), 0) - cpuBefore;
  const gib = (2 * RUNS * bytes) / 1024 ** 3;
  const req: number[] = [];
  for (let i = 0; i < RUNS; i++) req.push(((await requestsTimed(proxyArgs, web.url('/hello'))) / REQUESTS) * 1000);
  const cpuSecPerGiB = pids.length ? cpu / gib : undefined;
  return [
    { system, cipher, metric: `download ${MB} MiB`, unit: 'MB/s', runs: down, median: median(down), cpuSecPerGiB },
    { system, cipher, metric: `upload ${MB} MiB`, unit: 'MB/s', runs: up, median: median(up), cpuSecPerGiB },
    { system, cipher, metric: `${REQUESTS} x 1 KiB requests`, unit: 'ms/request', runs: req, median: median(req) },
  ];
}

async function main(): Promise<void> {
  const tmp = tempDir('dshield-bench-');
  const payload = randomBytes(MB * 1024 * 1024);
  const upload = join(tmp.dir, 'upload.bin');
  writeFileSync(upload, payload);
  const web = await startWebServer(payload);
  const rows: Row[] = [];
  try {
    console.log(`baseline: curl straight to the web server (${MB} MiB x ${RUNS})`);
    const base = await measure('plain (no proxy)', '-', [], web, upload, []);
    rows.push(...base);
    for (const transport of ['tcp', 'ws']) {
      for (const cipher of ['chacha20-poly1305', 'aes-256-gcm']) {
        console.log(`dshield ${transport} ${cipher}`);
        let t: TunnelProcs | undefined;
        try {
          t = await startTunnel({ transport, cipher, extra: { logging: [{ use: 'console', level: 'warn' }] } });
          const measured = await measure(`dshield socks5/${transport}`, cipher, ['--socks5-hostname', t.socks], web, upload, [
            t.server.child.pid!,
            t.client.child.pid!,
          ]);
          measured.forEach((r, i) => {
            // Throughput: higher is better (ratio = r / baseline); latency: the added time per request.
            r.ratio = r.unit === 'MB/s' ? r.median / base[i]!.median : r.median - base[i]!.median;
          });
          rows.push(...measured);
        } finally {
          await t?.close();
        }
      }
    }
  } finally {
    await web.close();
    await stopAll();
    tmp.cleanup();
  }

  const header = '| system | cipher | metric | median | min–max | vs baseline | CPU s/GiB |';
  const lines = [header, '|---|---|---|---|---|---|---|'];
  for (const r of rows) {
    const vs = r.ratio === undefined ? '—' : r.unit === 'MB/s' ? `${r.ratio.toFixed(2)}×` : `+${r.ratio.toFixed(2)} ms`;
    lines.push(
      `| ${r.system} | ${r.cipher} | ${r.metric} | ${r.median.toFixed(1)} ${r.unit} | ${Math.min(...r.runs).toFixed(1)}–${Math.max(...r.runs).toFixed(1)} | ${vs} | ${r.cpuSecPerGiB?.toFixed(2) ?? '—'} |`,
    );
  }
  const table = lines.join('\n');
  console.log(`\n${table}\n`);
  mkdirSync(RESULTS, { recursive: true });
  const meta = { date: new Date().toISOString(), node: process.version, mb: MB, runs: RUNS };
  writeFileSync(join(RESULTS, 'proxy.json'), JSON.stringify({ ...meta, rows }, null, 2) + '\n');
  writeFileSync(join(RESULTS, 'proxy.md'), `# Proxy-mode benchmark\n\n${JSON.stringify(meta)}\n\n${table}\n`);
  console.log(`written to ${RESULTS}`);
}

await main();
