/**
 * The bench's verdicts (bench/report.ts): each target of issue 4 decided by
 * ratios between rows of one run; and the CPU steal it records per system
 * (bench/proc.ts: over a system's own turns when systems take turns), as the
 * results table shows it. Synthetic rows, so every
 * verdict is known in advance; the bench itself is never run here.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { computeRatios, evaluateTargets, finish, markdownTable, type Row, type Target } from '../bench/report.ts';
import { StealMeter, stealInProcStat } from '../bench/proc.ts';
import { cpus } from 'node:os';

type Spec = Pick<Row, 'section' | 'id' | 'role' | 'metric'> & Partial<Row>;

function row(spec: Spec, runs: number[]): Row {
  const latency = spec.metric === 'ping' || spec.metric === 'requests';
  return finish({
    system: spec.id,
    mode: 'TUN',
    cipher: spec.id.split('/').pop()!,
    label: spec.metric,
    unit: latency ? 'ms' : 'Mbit/s',
    better: latency ? 'lower' : 'higher',
    additive: latency || undefined,
    status: 'ok',
    ...spec,
    runs,
  });
}

/** A TUN section: the baseline, wireguard-go, OpenVPN with aes-256-gcm, and dshield over udp with both ciphers. */
function tunRows(dshield: { up: number; down: number; ping: number; requests: number }): Row[] {
  const rows: Row[] = [];
  const add = (id: string, role: Row['role'], v: { up: number; down: number; ping: number; requests: number }) => {
    rows.push(row({ section: 'tun', id, role, metric: 'tcp1-up' }, [v.up * 0.9, v.up, v.up * 1.1]));
    rows.push(row({ section: 'tun', id, role, metric: 'tcp1-down' }, [v.down, v.down, v.down]));
    rows.push(row({ section: 'tun', id, role, metric: 'ping' }, [v.ping, v.ping + 0.1, v.ping - 0.01]));
    rows.push(row({ section: 'tun', id, role, metric: 'requests' }, [v.requests]));
  };
  add('plain', 'baseline', { up: 9000, down: 9000, ping: 0.06, requests: 0.6 });
  add('wireguard-go', 'peer', { up: 200, down: 210, ping: 0.8, requests: 2.0 });
  add('openvpn/aes-256-gcm', 'peer', { up: 300, down: 280, ping: 0.4, requests: 0.9 });
  add('dshield-tun/udp/chacha20-poly1305', 'dshield', dshield);
  add('dshield-tun/udp/aes-256-gcm', 'dshield', dshield);
  return rows;
}

function verdict(targets: Target[], text: string): Target {
  const t = targets.find((x) => x.text.startsWith(text));
  if (!t) throw new Error(`no target "${text}" among:\n${targets.map((x) => x.text).join('\n')}`);
  return t;
}

test('TUN throughput: against the best peer and against wireguard-go, by the medians', () => {
  const fast = evaluateTargets(tunRows({ up: 600, down: 560, ping: 0.3, requests: 0.8 }));
  const best = verdict(fast, 'TUN TCP over udp (chacha20-poly1305), client→web: ≥ 1.0× the best peer');
  assert.is(best.verdict, 'PASS');
  assert.match(best.detail, /^2\.00× openvpn\/aes-256-gcm aes-256-gcm \(600 vs 300 Mbit\/s\)/);
  assert.is(verdict(fast, 'TUN TCP over udp (aes-256-gcm), web→client: ≥ 1.5× wireguard-go').verdict, 'PASS');
  // 1.4x wireguard-go and 1.0x OpenVPN: the first fails, the second passes (>= 1.0 is met).
  const close = evaluateTargets(tunRows({ up: 300, down: 294, ping: 0.3, requests: 0.8 }));
  assert.is(verdict(close, 'TUN TCP over udp (chacha20-poly1305), client→web: ≥ 1.0× the best peer').verdict, 'PASS');
  assert.is(verdict(close, 'TUN TCP over udp (chacha20-poly1305), web→client: ≥ 1.5× wireguard-go').verdict, 'FAIL');
  assert.is(verdict(close, 'TUN TCP over udp (chacha20-poly1305), web→client: ≥ 1.0× the best peer').verdict, 'PASS');
});

test('ping and per-request time: the time added over the baseline, against the best peer\'s added time', () => {
  // OpenVPN adds 0.40 - 0.06 = 0.34 ms a ping; dshield at 0.38 adds 0.32 (met), at 0.45 adds 0.39 (not).
  const met = evaluateTargets(tunRows({ up: 600, down: 600, ping: 0.38, requests: 0.85 }));
  const ping = verdict(met, 'TUN added ping RTT over udp (chacha20-poly1305)');
  assert.is(ping.verdict, 'PASS');
  assert.match(ping.detail, /^\+0\.320 ms vs \+0\.340 ms \(openvpn\/aes-256-gcm/);
  assert.is(verdict(met, 'TUN added time per 1 KiB request over udp (aes-256-gcm)').verdict, 'PASS');
  const missed = evaluateTargets(tunRows({ up: 600, down: 600, ping: 0.45, requests: 0.95 }));
  assert.is(verdict(missed, 'TUN added ping RTT over udp (aes-256-gcm)').verdict, 'FAIL');
  assert.is(verdict(missed, 'TUN added time per 1 KiB request over udp (chacha20-poly1305)').verdict, 'FAIL');
  // computeRatios gives the same comparison per row: the added time as a multiple of the best peer's.
  const rows = tunRows({ up: 600, down: 600, ping: 0.45, requests: 0.95 });
  computeRatios(rows);
  const me = rows.find((r) => r.id === 'dshield-tun/udp/aes-256-gcm' && r.metric === 'ping')!;
  assert.ok(Math.abs(me.vsBestPeer! - 0.39 / 0.34) < 1e-9, `vsBestPeer ${me.vsBestPeer}`);
  assert.ok(Math.abs(me.vsBaseline! - 0.39) < 1e-9, `vsBaseline ${me.vsBaseline}`);
});

test('handshakes: one target per transport measured; a transport not run is NOT MEASURED, not a pass', () => {
  const hs = (transport: string, perCore: number[]): Row =>
    row({ section: 'scale', id: `dshield-handshakes/${transport}/chacha20-poly1305`, role: 'dshield', metric: 'handshakes-per-core', unit: '/s', better: 'higher' }, perCore);
  const both = evaluateTargets([hs('tcp', [1798, 1879, 1728]), hs('udp', [1774, 2040, 2116])]);
  const tcp = verdict(both, '≥ 2,000 handshakes/s on one core over tcp');
  assert.is(tcp.verdict, 'FAIL');
  assert.match(tcp.detail, /^1798 per server CPU-second \(0\.90× the target\)/);
  assert.is(verdict(both, '≥ 2,000 handshakes/s on one core over udp').verdict, 'PASS');
  const tcpOnly = evaluateTargets([hs('tcp', [2100, 2200, 2300])]);
  assert.is(verdict(tcpOnly, '≥ 2,000 handshakes/s on one core over tcp').verdict, 'PASS');
  const udp = verdict(tcpOnly, '≥ 2,000 handshakes/s on one core over udp');
  assert.is(udp.verdict, 'NOT MEASURED');
  assert.is(udp.detail, 'not run');
  const failed: Row = { ...hs('udp', []), status: 'failed', reason: 'no handshake completed' };
  assert.is(verdict(evaluateTargets([failed]), '≥ 2,000 handshakes/s on one core over udp').detail, 'failed: no handshake completed');
});

test('proxy: each dshield row against shadowsocks-libev with the same cipher; memory and p99 with a starved stream', () => {
  const proxy = (id: string, role: Row['role'], down: number, up: number): Row[] => [
    row({ section: 'proxy', id, role, metric: 'download', unit: 'MB/s' }, [down]),
    row({ section: 'proxy', id, role, metric: 'upload', unit: 'MB/s' }, [up]),
  ];
  const scale = (metric: string, value: number, extra: Record<string, unknown>): Row =>
    row({ section: 'scale', id: 'dshield-proxy/tcp/chacha20-poly1305', role: 'dshield', metric, unit: metric === 'idle-server-mem' ? 'KiB' : 'ms', better: 'lower', extra }, [value]);
  const targets = evaluateTargets([
    ...proxy('shadowsocks/chacha20-ietf-poly1305', 'peer', 230, 200),
    ...proxy('shadowsocks/aes-256-gcm', 'peer', 280, 240),
    ...proxy('dshield-proxy/tcp/chacha20-poly1305', 'dshield', 260, 220),
    ...proxy('dshield-proxy/tcp/aes-256-gcm', 'dshield', 260, 220),
    scale('idle-server-mem', 9.7, { streams: 10000 }),
    scale('active-p99', 30, { streams: 1000, minPerStream: 0 }),
  ]);
  // 260 MB/s is 1.13x shadowsocks's chacha20 and 0.93x its aes-256-gcm: each compared with its own cipher.
  assert.is(verdict(targets, 'proxy download over tcp (chacha20-poly1305)').verdict, 'PASS');
  const aes = verdict(targets, 'proxy download over tcp (aes-256-gcm)');
  assert.is(aes.verdict, 'FAIL');
  assert.match(aes.detail, /^0\.93× \(260 vs 280 MB\/s\)/);
  assert.is(verdict(targets, 'proxy upload over ws (chacha20-poly1305)').verdict, 'NOT MEASURED');
  assert.is(verdict(targets, '≤ 16 KiB server memory per idle stream').verdict, 'PASS');
  // A p99 inside 50 ms with a stream that got no round trip at all is a starved stream: not met.
  assert.is(verdict(targets, 'p99 of a 1 KiB request ≤ 50 ms').verdict, 'FAIL');
});

test('CPU steal: a system measured in turns counts only its own turns', () => {
  // A clock the test moves: wall milliseconds, and steal in seconds over all CPUs.
  const now = { at: 0, stolen: 0 };
  const meter = new StealMeter(() => ({ ...now }));
  const n = cpus().length;
  now.at = 10_000; // its own turn: 10 s, 10 % of the CPUs' time stolen
  now.stolen = 0.1 * 10 * n;
  meter.pause();
  now.at = 30_000; // another system's turn, heavily stolen: not counted
  now.stolen += 0.5 * 20 * n;
  meter.resume();
  meter.resume(); // resuming twice starts no second stretch
  now.at = 40_000; // its own again: 10 s, none stolen
  assert.ok(Math.abs(meter.percent() - 5) < 1e-9, `5 % over its 20 s, got ${meter.percent()}`);
  meter.pause();
  meter.pause();
  now.at = 100_000;
  assert.ok(Math.abs(meter.percent() - 5) < 1e-9, 'a paused meter stays where it was');
});

test('CPU steal: read from /proc/stat, shown per row in the results table', () => {
  assert.is(stealInProcStat('cpu  1804694 0 1041277 3156495 25150 0 380972 144574 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n'), 1445.74);
  assert.is(stealInProcStat('cpu  1 2 3 4 5 6 7\n'), 0, 'a kernel without the steal column');
  assert.is(stealInProcStat('intr 5 6\n'), 0);
  const rows = tunRows({ up: 600, down: 650, ping: 0.45, requests: 0.8 });
  for (const r of rows) if (r.id === 'openvpn/aes-256-gcm') r.stealPercent = 2.46;
  computeRatios(rows);
  const lines = markdownTable(rows).split('\n');
  assert.match(lines[0]!, /\| CPU steal \|$/);
  const cells = (id: string) => lines.find((l) => l.startsWith(`| ${id} |`) && l.includes('| ping |'))!.split('|').map((c) => c.trim());
  assert.is(cells('openvpn/aes-256-gcm').at(-2), '2.5 %');
  assert.is(cells('wireguard-go').at(-2), '—', 'a row measured without the meter');
});

test.run();
