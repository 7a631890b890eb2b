/**
 * What a Node TUN relay with nothing of a VPN's work adds to a ping and to a
 * 1 KiB request, beside dshield and OpenVPN, in one sitting.
 *
 *   sudo npx tsx bench/relay-floor.ts    (Linux, root; ping, iperf3, curl, openvpn: `npm run bench` installs them)
 *
 * Why: dshield TUN over udp adds more to a ping than OpenVPN. Part of that
 * could be what any Node process pays on a CPU back from idle, and part
 * dshield's own work per packet. bench/drivers/tun-relay.ts makes the same
 * calls dshield's packet thread makes (poll, read, sendto, recvfrom and
 * write through koffi; the same libsodium AEAD through koffi) with nothing
 * else: no session, no replay window, no key age, no routing, no
 * statistics. Its rows split the gap: the relay's row is the floor a Node
 * data path stands on, dshield's row over it is dshield's own work.
 *
 * Systems, each beside plain forwarding, after the same 2 s of iperf3 and
 * 50 pings of warm-up: the relay with no AEAD, with the cipher's AEAD, and
 * with the AEAD in a worker thread on a TUN with a vnet header (as dshield
 * runs); dshield TUN over udp; OpenVPN with the same cipher. Each is timed
 * by ping 10 ms apart (the bench's spacing), by sequential 1 KiB requests,
 * and by the CPU its processes take per ping (schedstat, all threads).
 *
 * Not part of `npm run bench`: it has no target; the README's "Where it
 * falls short" quotes it. Rounds alternate the order of the systems. Every
 * ping and request run is bounded in count and time.
 *
 *   DSHIELD_BENCH_RELAY_CIPHER=chacha20-poly1305 | aes-256-gcm   (default chacha20-poly1305)
 *   DSHIELD_BENCH_RELAY_ROUNDS=4
 *   DSHIELD_BENCH_RELAY_PINGS=500
 *   DSHIELD_BENCH_RELAY_REQUESTS=100
 */
import { readFileSync, readdirSync } from 'node:fs';
import { hasTool } from '../test/helpers/netns.ts';
import { dshieldTun } from './dshield.ts';
import { pingRtt, sequentialRequests } from './measure.ts';
import { openvpnAes, openvpnChacha, plainForwarding, type SystemSpec } from './peers.ts';
import { relay } from './relay-spec.ts';
import { median } from './report.ts';
import { runSitting } from './sittings.ts';

const CIPHER = process.env.DSHIELD_BENCH_RELAY_CIPHER ?? 'chacha20-poly1305';
const ROUNDS = Math.max(1, Number(process.env.DSHIELD_BENCH_RELAY_ROUNDS ?? 4) || 4);
const PINGS = Math.min(2000, Math.max(50, Number(process.env.DSHIELD_BENCH_RELAY_PINGS ?? 500) || 500));
const REQUESTS = Math.min(500, Math.max(10, Number(process.env.DSHIELD_BENCH_RELAY_REQUESTS ?? 100) || 100));

function fail(message: string): never {
  console.error(`relay-floor: ${message}`);
  process.exit(1);
}

if (CIPHER !== 'chacha20-poly1305' && CIPHER !== 'aes-256-gcm') fail(`DSHIELD_BENCH_RELAY_CIPHER must be chacha20-poly1305 or aes-256-gcm, not ${CIPHER}`);
if (process.platform !== 'linux' || process.getuid?.() !== 0) fail('run it as root on Linux: it builds network namespaces');

const systems: Array<[name: string, spec: SystemSpec]> = [
  ['plain', plainForwarding],
  ['relay, no AEAD', relay('none', [])],
  ['relay, AEAD', relay(CIPHER, [])],
  ['relay, AEAD, thread, vnet', relay(CIPHER, ['thread', 'vnet'])],
  ['dshield', dshieldTun('udp', CIPHER)],
  ['OpenVPN', CIPHER === 'aes-256-gcm' ? openvpnAes : openvpnChacha],
];
const missing = ['ping', 'iperf3', 'curl', 'ip', 'nft', ...systems.flatMap(([, s]) => s.needs)].filter((tool) => !hasTool(tool));
if (missing.length > 0) fail(`missing ${[...new Set(missing)].join(', ')} (\`npm run bench\` installs them)`);

/** CPU time (ns) that every thread of `pid` has run, from schedstat; 0 once it is gone. */
function cpuNs(pid: number): number {
  let total = 0;
  try {
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      try {
        total += Number(readFileSync(`/proc/${pid}/task/${task}/schedstat`, 'utf8').split(' ')[0]);
      } catch {
        // the thread ended meanwhile
      }
    }
  } catch {
    return 0;
  }
  return total;
}

interface Round {
  ping: number;
  request: number;
  /** µs of CPU per ping, each process (the tunnel's server, then its client); empty for plain forwarding. */
  cpu: number[];
}
const results = new Map<string, Round[]>(systems.map(([name]) => [name, []]));
try {
  await runSitting({
    systems,
    rounds: ROUNDS,
    workPrefix: 'dshield-relay-floor-',
    async measure(name, running, bt, round) {
      const before = running.pids.map(cpuNs);
      const ping = await pingRtt(bt, PINGS);
      const cpu = running.pids.map((pid, i) => (cpuNs(pid) - before[i]!) / PINGS / 1000);
      const request = await sequentialRequests(bt, REQUESTS, `relay-floor=${round}`, []);
      results.get(name)!.push({ ping, request, cpu });
      console.log(`round ${round + 1}/${ROUNDS} ${name.padEnd(26)} ping ${ping.toFixed(3)} ms, request ${request.toFixed(3)} ms, CPU µs a ping ${cpu.map((x) => x.toFixed(0)).join(' + ') || '—'}`);
    },
  });
} catch (err) {
  fail(err instanceof Error ? err.message : String(err));
}

const plain = results.get('plain')!;
/** What a system adds over plain forwarding, round by round (each round's own baseline). */
const added = (rounds: Round[], key: 'ping' | 'request'): number[] => rounds.map((r, i) => r[key] - plain[i]![key]);
const signed = (ms: number): string => `${ms < 0 ? '−' : '+'}${Math.abs(ms).toFixed(3)}`;
const range = (values: number[]): string => `${signed(Math.min(...values))} to ${signed(Math.max(...values))}`;
const openvpnPing = median(added(results.get('OpenVPN')!, 'ping'));
const openvpnRequest = median(added(results.get('OpenVPN')!, 'request'));

console.log(`\n${CIPHER}, ${ROUNDS} round(s), ${PINGS} pings 10 ms apart and ${REQUESTS} requests each; medians (min–max):`);
console.log('| system | added ping (ms) | vs OpenVPN | added per request (ms) | vs OpenVPN | CPU µs a ping, server + client |');
console.log('|---|---|---|---|---|---|');
for (const [name] of systems.slice(1)) {
  const rounds = results.get(name)!;
  const ping = added(rounds, 'ping');
  const request = added(rounds, 'request');
  const cpu = [0, 1].map((i) => median(rounds.map((r) => r.cpu[i] ?? 0)).toFixed(0)).join(' + ');
  console.log(
    `| ${name} | ${signed(median(ping))} (${range(ping)}) | ${(median(ping) / openvpnPing).toFixed(2)}× | ${signed(median(request))} (${range(request)}) | ${(median(request) / openvpnRequest).toFixed(2)}× | ${cpu} |`,
  );
}
