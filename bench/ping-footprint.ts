/**
 * How much memory each process of a VPN touches to carry one ping, dshield
 * against OpenVPN with the same cipher: the pages it referenced, by mapping.
 *
 *   sudo npx tsx bench/ping-footprint.ts    (Linux, root; ping, iperf3, openvpn: `npm run bench` installs them)
 *
 * Why: a ping 10 ms after the last costs each dshield process more CPU than
 * it costs OpenVPN's, with the same wake-ups (see the README's "Where it
 * falls short"). On a CPU back from idle every line of code or data the
 * work needs is likely a cache miss, so the memory a ping touches is a
 * measure of what it costs there. This machine's VM has no hardware cache
 * counters; the kernel's accessed bits count pages instead
 * (bench/page-refs.ts): clear them, send one ping, read back what each
 * process touched. A control sample without a ping (the same kind of
 * program started in the client namespace, `true`) counts what touches the
 * shared libraries' pages meanwhile, and is subtracted mapping by mapping.
 *
 * Not part of `npm run bench`: it has no target. Each system runs after 2 s
 * of iperf3 and 100 pings, as in the bench; samples are 200 ms apart.
 *
 *   DSHIELD_BENCH_FOOTPRINT_CIPHER=chacha20-poly1305 | aes-256-gcm   (default chacha20-poly1305)
 *   DSHIELD_BENCH_FOOTPRINT_SAMPLES=8                                 (pings, and as many controls)
 *   DSHIELD_BENCH_FOOTPRINT_BY_REGION=1                               (each anonymous mapping on its own, by address)
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { hasTool } from '../test/helpers/netns.ts';
import { dshieldTun } from './dshield.ts';
import { pingRtt } from './measure.ts';
import { clearRefs, totalKib, touchedKib } from './page-refs.ts';
import { openvpnAes, openvpnChacha, type Running, type SystemSpec } from './peers.ts';
import { median } from './report.ts';
import { runSitting } from './sittings.ts';
import { exec, type BenchTopology } from './topology.ts';

const CIPHER = process.env.DSHIELD_BENCH_FOOTPRINT_CIPHER ?? 'chacha20-poly1305';
const SAMPLES = Math.max(1, Number(process.env.DSHIELD_BENCH_FOOTPRINT_SAMPLES ?? 8) || 8);
const QUIET_MS = 200;
const BY_REGION = process.env.DSHIELD_BENCH_FOOTPRINT_BY_REGION === '1';

function fail(message: string): never {
  console.error(`ping-footprint: ${message}`);
  process.exit(1);
}

if (CIPHER !== 'chacha20-poly1305' && CIPHER !== 'aes-256-gcm') fail(`DSHIELD_BENCH_FOOTPRINT_CIPHER must be chacha20-poly1305 or aes-256-gcm, not ${CIPHER}`);
if (process.platform !== 'linux' || process.getuid?.() !== 0) fail('run it as root on Linux: it builds network namespaces and reads other processes\' page flags');

const systems: SystemSpec[] = [dshieldTun('udp', CIPHER), CIPHER === 'aes-256-gcm' ? openvpnAes : openvpnChacha];
const missing = ['ping', 'iperf3', 'ip', 'nft', ...systems.flatMap((s) => s.needs)].filter((tool) => !hasTool(tool));
if (missing.length > 0) fail(`missing ${[...new Set(missing)].join(', ')} (\`npm run bench\` installs them)`);

/** Sample what each of `running`'s processes touches per ping and print it under `label`. */
async function measure(label: string, running: Running, bt: BenchTopology): Promise<void> {
  // 50 more pings on top of the sitting's warm-up: 100, as the bench's ping run is.
  await pingRtt(bt, 50);
  const pids = running.pids;
  const programs = pids.map((pid) => basename(readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0')[0]!));
  const where = pids.map((pid) => execFileSync('ip', ['netns', 'identify', String(pid)]).toString().trim());
  const samples = pids.map(() => ({ ping: [] as Array<Map<string, number>>, control: [] as Array<Map<string, number>> }));
  for (let i = 0; i < 2 * SAMPLES; i++) {
    const ping = i % 2 === 1;
    await new Promise((r) => setTimeout(r, QUIET_MS));
    for (const pid of pids) clearRefs(pid);
    if (ping) await exec(bt.topo.ns.client, 'ping', ['-n', '-q', '-c', '1', '-W', '2', bt.webIp], { timeout: 5_000 });
    else await exec(bt.topo.ns.client, 'true', [], { timeout: 5_000 });
    pids.forEach((pid, j) => samples[j]![ping ? 'ping' : 'control'].push(touchedKib(pid, programs[j]!, BY_REGION)));
  }
  console.log(`\n${label}: KiB touched per ping, the control's median subtracted (median of ${SAMPLES})`);
  pids.forEach((pid, j) => {
    const { ping, control } = samples[j]!;
    const side = where[j] === bt.topo.ns.client ? 'client' : where[j] === bt.topo.ns.server ? 'server' : where[j] || '?';
    const total = median(ping.map(totalKib)) - median(control.map(totalKib));
    const kinds = new Set([...ping, ...control].flatMap((m) => [...m.keys()]));
    const parts = [...kinds]
      .map((kind) => [kind, median(ping.map((m) => m.get(kind) ?? 0)) - median(control.map((m) => m.get(kind) ?? 0))] as const)
      .filter(([, kib]) => kib >= 4)
      .sort((a, b) => b[1] - a[1]);
    console.log(`  ${side} (${programs[j]}, pid ${pid}): ${total} KiB = ${parts.map(([k, v]) => `${k} ${v}`).join(', ')}`);
  });
}

try {
  await runSitting({
    systems: systems.map((spec) => [`${spec.system} (${spec.cipher})`, spec]),
    rounds: 1,
    workPrefix: 'dshield-footprint-',
    measure,
  });
} catch (err) {
  fail(err instanceof Error ? err.message : String(err));
}
