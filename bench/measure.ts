/**
 * One measurement each, run from the client namespace toward the web host:
 * iperf3 TCP and UDP, ping, sequential small HTTP requests, and bulk
 * transfers through a SOCKS5 proxy with curl. Every command has a time bound;
 * a failure rejects with the tool's own words.
 */
import { exec } from '../test/helpers/netns.ts';
import { PORTS } from './settings.ts';
import type { BenchTopology } from './topology.ts';

export interface Transfer {
  /** Bits per second as the receiver saw them. */
  bps: number;
  /** Bytes the receiver got. */
  bytes: number;
}

interface IperfEnd {
  end?: {
    sum_received?: { bits_per_second: number; bytes: number };
    sum?: { bits_per_second: number; bytes: number; lost_percent?: number; packets?: number; lost_packets?: number; seconds?: number };
  };
  error?: string;
}

async function iperf(bt: BenchTopology, args: string[], seconds: number): Promise<IperfEnd> {
  for (let attempt = 1; ; attempt++) {
    const r = await exec(bt.topo.ns.client, 'iperf3', ['-c', bt.webIp, '-p', String(PORTS.iperf), '-J', '-t', String(seconds), '--connect-timeout', '5000', ...args], {
      timeout: (seconds + 25) * 1000,
      allowFail: true,
    });
    let parsed: IperfEnd;
    try {
      parsed = JSON.parse(r.stdout) as IperfEnd;
    } catch {
      parsed = { error: (r.stderr || r.stdout || `iperf3 exited ${r.code}`).trim().split('\n')[0] };
    }
    // The server is busy for a moment after a previous test ended abruptly: retry.
    if (parsed.error && /busy/i.test(parsed.error) && attempt < 3) {
      await new Promise((res) => setTimeout(res, 1500));
      continue;
    }
    // iperf3's own race at a test's end through a NAT (esnet/iperf#499: the server closes the
    // control connection before the client has, and it is reset): seen once in the bench's
    // UDP search, through a tunnel that went on working. Retried once, and said so.
    // A persistent iperf3 server closes its listening socket after each test and makes it
    // again, so a connection that comes while the last test is finishing is reset or
    // refused (esnet/iperf#2066; seen once here, through TUN over ws). Retried once, and said so.
    if (parsed.error && /unable to connect to server: connection (refused|reset)/i.test(parsed.error) && attempt < 2) {
      console.log(`    iperf3 ${args.join(' ')}: ${parsed.error}; retrying once`);
      await new Promise((res) => setTimeout(res, 1500));
      continue;
    }
    if (parsed.error && /control (message|socket)/i.test(parsed.error) && attempt < 2) {
      console.log(`    iperf3 ${args.join(' ')}: ${parsed.error}; retrying once`);
      await new Promise((res) => setTimeout(res, 1500));
      continue;
    }
    if (parsed.error || r.code !== 0) throw new Error(`iperf3 ${args.join(' ')}: ${parsed.error ?? `exit ${r.code}`}`);
    return parsed;
  }
}

/** iperf3 TCP, `streams` parallel streams; reverse = web host sends to the client (download). */
export async function iperfTcp(bt: BenchTopology, opts: { streams: number; reverse: boolean; seconds: number }): Promise<Transfer> {
  const args = ['-P', String(opts.streams), '-O', '1', ...(opts.reverse ? ['-R'] : [])];
  const r = await iperf(bt, args, opts.seconds + 1);
  const s = r.end?.sum_received;
  if (!s) throw new Error('iperf3 gave no sum_received');
  return { bps: s.bits_per_second, bytes: s.bytes };
}

export interface UdpResult {
  /** Datagrams per second received at the highest offered rate with < 1 % loss (0 if none passed). */
  pps: number;
  lossPercent: number;
  offeredBps: number;
  bytes: number;
  /** Each step: offered rate (bit/s or 0 = unlimited), received pps, loss %. */
  steps: Array<{ offered: number; pps: number; loss: number }>;
}

const DATAGRAM = 1400;
/** Extra halving steps of the UDP search while no rate has passed yet. */
const UDP_EXTRA_STEPS = 5;

async function udpStep(bt: BenchTopology, offeredBps: number, seconds: number): Promise<{ pps: number; loss: number; bytes: number }> {
  // -w: 4 MiB socket buffers, so the receiving iperf3's scheduling hiccups are not counted as the system's loss.
  const r = await iperf(bt, ['-u', '-l', String(DATAGRAM), '-w', '4M', '-b', String(Math.round(offeredBps))], seconds);
  const s = r.end?.sum;
  if (!s || s.packets === undefined) throw new Error('iperf3 UDP gave no packet counts');
  const received = s.packets - (s.lost_packets ?? 0);
  return { pps: received / (s.seconds ?? seconds), loss: s.lost_percent ?? 0, bytes: received * DATAGRAM };
}

/**
 * Packets per second of 1400-byte datagrams at < 1 % loss: an unlimited
 * probe says what gets through; then offered rates step down from just
 * under that until the loss is under 1 % (`steps` steps, and up to
 * UDP_EXTRA_STEPS more, halving the rate, while none has passed).
 */
export async function udpSearch(bt: BenchTopology, seconds: number, steps: number): Promise<UdpResult> {
  const probe = await udpStep(bt, 0, seconds);
  const trail = [{ offered: 0, pps: probe.pps, loss: probe.loss }];
  let bytes = probe.bytes;
  let offered = probe.pps * DATAGRAM * 8 * (probe.loss < 1 ? 1.1 : 0.95);
  let best: { pps: number; loss: number; offered: number } | undefined;
  let lower = 0;
  // Until one rate passes, keep stepping down (a bounded number of extra steps):
  // "0 pps" would otherwise mean only that the search gave up too early.
  for (let i = 0; i < steps || (best === undefined && i < steps + UDP_EXTRA_STEPS); i++) {
    const step = await udpStep(bt, offered, seconds);
    bytes += step.bytes;
    trail.push({ offered, pps: step.pps, loss: step.loss });
    if (step.loss < 1) {
      if (!best || step.pps > best.pps) best = { ...step, offered };
      lower = offered;
      // Passed: try between here and the last failure (or a bit higher), unless already close.
      const failed = trail.filter((t) => t.offered > offered && t.loss >= 1).map((t) => t.offered);
      const upper = failed.length ? Math.min(...failed) : offered * 1.25;
      if (upper / offered < 1.08) break;
      offered = (offered + upper) / 2;
    } else {
      // What got through at this rate is the best guess of capacity: aim just under it.
      offered = lower > 0 ? (lower + offered) / 2 : Math.min(offered * (i >= steps ? 0.5 : 0.8), step.pps * DATAGRAM * 8 * 0.95);
      if (lower > 0 && offered / lower < 1.05) break;
    }
  }
  return { pps: best?.pps ?? 0, lossPercent: best?.loss ?? probe.loss, offeredBps: best?.offered ?? 0, bytes, steps: trail };
}

/** Average ping RTT in ms (`count` pings `intervalMs` apart: 10, the bench's spacing, unless told). */
export async function pingRtt(bt: BenchTopology, count: number, intervalMs = 10): Promise<number> {
  const args = ['-n', '-q', '-c', String(count), '-i', String(intervalMs / 1000), '-W', '2', bt.webIp];
  const r = await exec(bt.topo.ns.client, 'ping', args, { timeout: count * (intervalMs + 40) + 15_000, allowFail: true });
  const m = /= [\d.]+\/([\d.]+)\/[\d.]+\/[\d.]+ ms/.exec(r.stdout);
  const loss = /(\d+(?:\.\d+)?)% packet loss/.exec(r.stdout)?.[1];
  if (!m) throw new Error(`ping: ${(r.stderr || r.stdout).trim().split('\n').pop()}`);
  if (loss && Number(loss) > 5) throw new Error(`ping lost ${loss}% of packets`);
  return Number(m[1]);
}

/**
 * Milliseconds per request for `n` sequential 1 KiB GETs, each on a new
 * connection (Connection: close), by one curl process: the sum of curl's own
 * per-request times, so curl's start-up is not counted.
 */
export async function sequentialRequests(bt: BenchTopology, n: number, marker: string, proxy: string[]): Promise<number> {
  const args = ['-sS', '--fail', '--noproxy', proxy.length ? '' : '*', '--max-time', '10', '-H', 'Connection: close', ...proxy, '-w', 'T %{time_total}\\n'];
  for (let i = 0; i < n; i++) args.push(`http://${bt.webIp}:${PORTS.http}/1k?${marker}&i=${i}`, '-o', '/dev/null');
  const r = await exec(bt.topo.ns.client, 'curl', args, { timeout: n * 1000 + 20_000, allowFail: true });
  const times = [...r.stdout.matchAll(/^T ([\d.]+)$/gm)].map((m) => Number(m[1]));
  if (r.code !== 0 || times.length !== n) throw new Error(`curl ${n} requests: exit ${r.code}, ${times.length} done: ${r.stderr.trim().split('\n')[0] ?? ''}`);
  return (times.reduce((a, b) => a + b, 0) / n) * 1000;
}

/** Download `bytes` with curl (through the proxy args, if any); returns MB/s (10^6). */
export async function curlDownload(bt: BenchTopology, bytes: number, marker: string, proxy: string[]): Promise<Transfer> {
  const r = await exec(
    bt.topo.ns.client,
    'curl',
    ['-sS', '--fail', '--noproxy', proxy.length ? '' : '*', '--max-time', '300', ...proxy, '-o', '/dev/null', '-w', '%{time_total} %{size_download}', `http://${bt.webIp}:${PORTS.http}/bytes/${bytes}?${marker}`],
    { timeout: 310_000, allowFail: true },
  );
  const [time, size] = r.stdout.trim().split(' ').map(Number);
  if (r.code !== 0 || size !== bytes) throw new Error(`curl download: exit ${r.code}, ${size} of ${bytes} bytes: ${r.stderr.trim()}`);
  return { bps: (bytes * 8) / time!, bytes };
}

/** Upload the file `path` (`bytes` long) with curl; returns the rate. */
export async function curlUpload(bt: BenchTopology, path: string, bytes: number, marker: string, proxy: string[]): Promise<Transfer> {
  const r = await exec(
    bt.topo.ns.client,
    'curl',
    ['-sS', '--fail', '--noproxy', proxy.length ? '' : '*', '--max-time', '300', ...proxy, '-T', path, '-w', ' %{time_total} %{size_upload}', `http://${bt.webIp}:${PORTS.http}/upload?${marker}`],
    { timeout: 310_000, allowFail: true },
  );
  const [echoed, time, size] = r.stdout.trim().split(/\s+/).map(Number);
  if (r.code !== 0 || size !== bytes || echoed !== bytes) throw new Error(`curl upload: exit ${r.code}, sent ${size}, server got ${echoed} of ${bytes}: ${r.stderr.trim()}`);
  return { bps: (bytes * 8) / time!, bytes };
}

/**
 * A tunnel just started, warmed up and not counted: 2 s of iperf3 through it
 * (none for the baseline, which has no process to warm) and 50 pings. Its
 * first traffic also compiles its path, which a VPN running for hours pays once.
 */
export async function warmUpTunnel(bt: BenchTopology, baseline: boolean): Promise<void> {
  if (!baseline) await iperfTcp(bt, { streams: 1, reverse: false, seconds: 2 });
  await pingRtt(bt, 50);
}
