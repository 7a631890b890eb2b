/**
 * What dshield and OpenVPN add to a ping when pings come 1 to 200 ms apart,
 * each beside plain forwarding, in one sitting.
 *
 *   sudo npx tsx bench/ping-spacing.ts    (Linux, root; ping, iperf3, openvpn: `npm run bench` installs them)
 *
 * Why: the bench pings 10 ms apart, and there dshield adds about 1.5× what
 * OpenVPN adds. Both make the same wake-ups per ping; what differs is the
 * CPU each takes on a CPU back from idle. If that is the cause, the gap
 * must shrink when pings come closer together (the caches and the CPU stay
 * warm) and grow when they come further apart. This checks that, on the
 * bench's own topology and systems: dshield TUN over udp and OpenVPN with
 * the same cipher, after the same 2 s of iperf3 and 50 pings of warm-up.
 *
 * Not part of `npm run bench`: it has no target; the README's "Where it
 * falls short" quotes it. Rounds alternate the order of the systems and of
 * the spacings. Every ping run is bounded in count and time.
 *
 *   DSHIELD_BENCH_SPACING_CIPHER=chacha20-poly1305 | aes-256-gcm   (default chacha20-poly1305)
 *   DSHIELD_BENCH_SPACING_MS=1,2,5,10,20,50,200                    (ms between pings)
 *   DSHIELD_BENCH_SPACING_ROUNDS=2
 */
import { hasTool } from '../test/helpers/netns.ts';
import { dshieldTun } from './dshield.ts';
import { pingRtt } from './measure.ts';
import { openvpnAes, openvpnChacha, plainForwarding, type SystemSpec } from './peers.ts';
import { median } from './report.ts';
import { runSitting } from './sittings.ts';

const CIPHER = process.env.DSHIELD_BENCH_SPACING_CIPHER ?? 'chacha20-poly1305';
const SPACINGS = (process.env.DSHIELD_BENCH_SPACING_MS ?? '1,2,5,10,20,50,200').split(',').map(Number);
const ROUNDS = Math.max(1, Number(process.env.DSHIELD_BENCH_SPACING_ROUNDS ?? 2) || 2);
/** 6 s of pings per spacing, but at least 30 and at most 500 of them (0.5 s 1 ms apart, 6 s from 12 ms). */
const pingsAt = (ms: number): number => Math.min(500, Math.max(30, Math.round(6000 / ms)));

function fail(message: string): never {
  console.error(`ping-spacing: ${message}`);
  process.exit(1);
}

if (CIPHER !== 'chacha20-poly1305' && CIPHER !== 'aes-256-gcm') fail(`DSHIELD_BENCH_SPACING_CIPHER must be chacha20-poly1305 or aes-256-gcm, not ${CIPHER}`);
if (SPACINGS.some((ms) => !Number.isFinite(ms) || ms < 1 || ms > 1000)) fail('DSHIELD_BENCH_SPACING_MS must list spacings from 1 to 1000 ms');
if (process.platform !== 'linux' || process.getuid?.() !== 0) fail('run it as root on Linux: it builds network namespaces');

const systems: Array<[name: string, spec: SystemSpec]> = [
  ['plain', plainForwarding],
  ['dshield', dshieldTun('udp', CIPHER)],
  ['openvpn', CIPHER === 'aes-256-gcm' ? openvpnAes : openvpnChacha],
];
const missing = ['ping', 'iperf3', 'ip', 'nft', ...systems.flatMap(([, s]) => s.needs)].filter((tool) => !hasTool(tool));
if (missing.length > 0) fail(`missing ${[...new Set(missing)].join(', ')} (\`npm run bench\` installs them)`);

/** RTT (ms) by system, then by spacing: one value per round. */
const rtt = new Map<string, Map<number, number[]>>(systems.map(([name]) => [name, new Map(SPACINGS.map((ms) => [ms, []]))]));
try {
  await runSitting({
    systems,
    rounds: ROUNDS,
    workPrefix: 'dshield-spacing-',
    async measure(name, _running, bt, round, backwards) {
      for (const ms of backwards ? [...SPACINGS].reverse() : SPACINGS) {
        const value = await pingRtt(bt, pingsAt(ms), ms);
        rtt.get(name)!.get(ms)!.push(value);
        console.log(`round ${round + 1}/${ROUNDS} ${name.padEnd(7)} ${String(ms).padStart(4)} ms apart: ${value.toFixed(3)} ms`);
      }
    },
  });
} catch (err) {
  fail(err instanceof Error ? err.message : String(err));
}

/** What a system adds over plain forwarding, round by round (each round's own baseline). */
const added = (name: string, ms: number): number[] => rtt.get(name)!.get(ms)!.map((v, i) => v - rtt.get('plain')!.get(ms)![i]!);
const range = (values: number[]): string => `${Math.min(...values).toFixed(3)}–${Math.max(...values).toFixed(3)}`;

console.log(`\nadded ping RTT over plain forwarding, ${CIPHER}, median of ${ROUNDS} round(s) (min–max):`);
console.log('| ms apart | plain RTT | dshield adds | OpenVPN adds | dshield / OpenVPN |');
console.log('|---|---|---|---|---|');
for (const ms of SPACINGS) {
  const d = added('dshield', ms);
  const o = added('openvpn', ms);
  console.log(
    `| ${ms} | ${median(rtt.get('plain')!.get(ms)!).toFixed(3)} ms | +${median(d).toFixed(3)} (${range(d)}) | +${median(o).toFixed(3)} (${range(o)}) | ${(median(d) / median(o)).toFixed(2)}× |`,
  );
}
