/**
 * Results: rows of measurements, the ratios that make them comparable within
 * one run (to the plain baseline, to the best established peer), the target
 * verdicts of issue 4, and the outputs — a console table, results.json,
 * results.md and an SVG bar chart of throughput by system.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export type Role = 'baseline' | 'peer' | 'reference' | 'dshield';
export type Status = 'ok' | 'not available yet' | 'skipped' | 'failed';

export interface Row {
  section: 'tun' | 'proxy' | 'scale';
  id: string;
  system: string;
  mode: string;
  cipher: string;
  role: Role;
  metric: string;
  label: string;
  unit: string;
  better: 'higher' | 'lower';
  /** Latency-like metrics are compared as time added over the baseline. */
  additive?: boolean;
  runs: number[];
  median?: number;
  min?: number;
  max?: number;
  cpuSecPerGB?: number;
  /** Percent of the machine's CPU time the hypervisor took (steal) while this system was measured (bench/proc.ts, StealMeter). */
  stealPercent?: number;
  status: Status;
  reason?: string;
  vsBaseline?: number;
  vsBestPeer?: number;
  bestPeer?: string;
  extra?: Record<string, unknown>;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function finish(row: Row): Row {
  if (row.runs.length) {
    row.median = median(row.runs);
    row.min = Math.min(...row.runs);
    row.max = Math.max(...row.runs);
  }
  return row;
}

/** Fill vsBaseline and vsBestPeer for every measured row. */
export function computeRatios(rows: Row[]): void {
  for (const row of rows) {
    if (row.status !== 'ok' || row.median === undefined) continue;
    const same = rows.filter((r) => r.section === row.section && r.metric === row.metric && r.status === 'ok' && r.median !== undefined);
    const base = same.find((r) => r.role === 'baseline');
    const value = (r: Row) => (row.additive && base ? r.median! - base.median! : r.median!);
    if (base && row.role !== 'baseline') row.vsBaseline = row.additive ? row.median - base.median! : row.median / base.median!;
    const peers = same.filter((r) => r.role === 'peer');
    if (peers.length && row.role !== 'baseline') {
      const best = peers.reduce((a, b) => ((row.better === 'higher' ? value(b) > value(a) : value(b) < value(a)) ? b : a));
      row.bestPeer = `${best.system} ${best.cipher}`;
      const bv = value(best);
      // An added latency at or below zero (noise: the peer measured faster than the baseline) makes no ratio.
      row.vsBestPeer = (row.additive ? bv <= 0.005 : Math.abs(bv) < 1e-9) ? undefined : value(row) / bv;
    }
  }
}

export interface Target {
  text: string;
  verdict: 'PASS' | 'FAIL' | 'NOT MEASURED';
  detail: string;
}

const find = (rows: Row[], id: string, metric: string) => rows.find((r) => r.id === id && r.metric === metric);
const ok = (r: Row | undefined): r is Row & { median: number } => r !== undefined && r.status === 'ok' && r.median !== undefined;
const whyNot = (r: Row | undefined) => (r ? `${r.status}${r.reason ? `: ${r.reason}` : ''}` : 'not run');

/** The targets of issue 4, each decided by ratios from this run. */
export function evaluateTargets(rows: Row[]): Target[] {
  const targets: Target[] = [];
  const bestPeer = (metric: string, section: 'tun' | 'proxy', additive = false) => {
    const base = rows.find((r) => r.section === section && r.metric === metric && r.role === 'baseline' && ok(r));
    const peers = rows.filter((r) => r.section === section && r.metric === metric && r.role === 'peer' && ok(r));
    if (!peers.length) return undefined;
    const v = (r: Row) => (additive ? r.median! - (base?.median ?? 0) : r.median!);
    const best = peers.reduce((a, b) => ((additive ? v(b) < v(a) : v(b) > v(a)) ? b : a));
    return { row: best, value: v(best), base };
  };
  for (const cipher of ['chacha20-poly1305', 'aes-256-gcm']) {
    const id = `dshield-tun/udp/${cipher}`;
    for (const [metric, dir] of [
      ['tcp1-up', 'client→web'],
      ['tcp1-down', 'web→client'],
    ] as const) {
      const me = find(rows, id, metric);
      const best = bestPeer(metric, 'tun');
      const wg = find(rows, 'wireguard-go', metric);
      const text1 = `TUN TCP over udp (${cipher}), ${dir}: ≥ 1.0× the best peer`;
      const text2 = `TUN TCP over udp (${cipher}), ${dir}: ≥ 1.5× wireguard-go`;
      if (!ok(me)) {
        targets.push({ text: text1, verdict: 'NOT MEASURED', detail: whyNot(me) }, { text: text2, verdict: 'NOT MEASURED', detail: whyNot(me) });
        continue;
      }
      if (best) {
        const ratio = me.median / best.value;
        targets.push({ text: text1, verdict: ratio >= 1 ? 'PASS' : 'FAIL', detail: `${ratio.toFixed(2)}× ${best.row.system} ${best.row.cipher} (${fmt(me.median)} vs ${fmt(best.value)} ${me.unit})` });
      } else targets.push({ text: text1, verdict: 'NOT MEASURED', detail: 'no peer measured' });
      if (ok(wg)) {
        const ratio = me.median / wg.median;
        targets.push({ text: text2, verdict: ratio >= 1.5 ? 'PASS' : 'FAIL', detail: `${ratio.toFixed(2)}× (${fmt(me.median)} vs ${fmt(wg.median)} ${me.unit})` });
      } else targets.push({ text: text2, verdict: 'NOT MEASURED', detail: `wireguard-go ${whyNot(wg)}` });
    }
    for (const [metric, what] of [
      ['ping', 'added ping RTT'],
      ['requests', 'added time per 1 KiB request'],
    ] as const) {
      const me = find(rows, id, metric);
      const best = bestPeer(metric, 'tun', true);
      const text = `TUN ${what} over udp (${cipher}): ≤ the best peer's`;
      if (!ok(me) || !best?.base) {
        targets.push({ text, verdict: 'NOT MEASURED', detail: ok(me) ? 'no peer or baseline measured' : whyNot(me) });
        continue;
      }
      const added = me.median - best.base.median!;
      targets.push({ text, verdict: added <= best.value ? 'PASS' : 'FAIL', detail: `${signed(added)} ms vs ${signed(best.value)} ms (${best.row.system} ${best.row.cipher})${metric === 'ping' ? hopFloorNote(rows) : ''}` });
    }
  }
  for (const transport of ['tcp', 'ws']) {
    for (const [cipher, ssCipher] of [
      ['chacha20-poly1305', 'chacha20-ietf-poly1305'],
      ['aes-256-gcm', 'aes-256-gcm'],
    ] as const) {
      for (const [metric, what] of [
        ['download', 'download'],
        ['upload', 'upload'],
      ] as const) {
        const me = find(rows, `dshield-proxy/${transport}/${cipher}`, metric);
        const ss = find(rows, `shadowsocks/${ssCipher}`, metric);
        const text = `proxy ${what} over ${transport} (${cipher}): ≥ 1.0× shadowsocks-libev ${ssCipher}`;
        if (!ok(me) || !ok(ss)) targets.push({ text, verdict: 'NOT MEASURED', detail: !ok(me) ? whyNot(me) : `shadowsocks ${whyNot(ss)}` });
        else {
          const ratio = me.median / ss.median;
          targets.push({ text, verdict: ratio >= 1 ? 'PASS' : 'FAIL', detail: `${ratio.toFixed(2)}× (${fmt(me.median)} vs ${fmt(ss.median)} ${me.unit})` });
        }
      }
    }
  }
  const scale = (metric: string) => rows.find((r) => r.section === 'scale' && r.role === 'dshield' && r.metric === metric);
  const idle = scale('idle-server-mem');
  targets.push(
    ok(idle)
      ? { text: `≤ 16 KiB server memory per idle stream (${idle.extra?.streams ?? '?'} streams)`, verdict: idle.median <= 16 ? 'PASS' : 'FAIL', detail: `${fmt(idle.median)} KiB per stream` }
      : { text: '≤ 16 KiB server memory per idle stream at 10,000 streams', verdict: 'NOT MEASURED', detail: whyNot(idle) },
  );
  for (const transport of ['tcp', 'udp']) {
    const hs = find(rows, `dshield-handshakes/${transport}/chacha20-poly1305`, 'handshakes-per-core');
    targets.push(
      ok(hs)
        ? { text: `≥ 2,000 handshakes/s on one core over ${transport} (server CPU-seconds)`, verdict: hs.median >= 2000 ? 'PASS' : 'FAIL', detail: `${fmt(hs.median)} per server CPU-second (${(hs.median / 2000).toFixed(2)}× the target)` }
        : { text: `≥ 2,000 handshakes/s on one core over ${transport}`, verdict: 'NOT MEASURED', detail: whyNot(hs) },
    );
  }
  const p99 = scale('active-p99');
  targets.push(
    ok(p99)
      ? {
          text: `p99 of a 1 KiB request ≤ 50 ms at ${p99.extra?.streams ?? '?'} active streams (paced, ~5k req/s), none starved`,
          verdict: p99.median <= 50 && Number(p99.extra?.minPerStream ?? 0) > 0 ? 'PASS' : 'FAIL',
          detail: `p99 ${fmt(p99.median)} ms; fewest requests on one stream: ${p99.extra?.minPerStream}`,
        }
      : { text: 'p99 of a 1 KiB request ≤ 50 ms at 1,000 active streams', verdict: 'NOT MEASURED', detail: whyNot(p99) },
  );
  return targets;
}

/**
 * What the relay-hop floor (bench/hop-floor.ts) says about the ping target:
 * a ping wakes four relays, so four times what the leanest Node hop costs
 * over a C hop is the least a Node VPN adds beyond a C one. Empty when not
 * measured.
 */
function hopFloorNote(rows: Row[]): string {
  const c = find(rows, 'hop/socat', 'hop-rtt');
  const nodes = ['hop/node', 'hop/node-loop', 'hop/node-uring'].map((id) => find(rows, id, 'hop-rtt')).filter(ok);
  if (!ok(c) || nodes.length === 0) return '';
  const perHop = Math.min(...nodes.map((n) => n.median)) - c.median;
  return `; floor: the leanest Node relay hop costs ${signed(perHop)} ms over a C one here, ×4 hops per ping = ${signed(4 * perHop)} ms`;
}

const signed = (n: number) => `${n >= 0 ? '+' : '−'}${fmt(Math.abs(n), 3)}`;

export function fmt(n: number, digits?: number): string {
  if (!Number.isFinite(n)) return String(n);
  const d = digits ?? (Math.abs(n) >= 100 ? 0 : Math.abs(n) >= 10 ? 1 : 2);
  return n.toFixed(d);
}

function cell(row: Row): { median: string; range: string; base: string; peer: string; cpu: string; steal: string } {
  if (row.status !== 'ok' || row.median === undefined) return { median: row.status, range: '', base: '', peer: '', cpu: '', steal: '' };
  const base = row.vsBaseline === undefined ? '—' : row.additive ? `${row.vsBaseline >= 0 ? '+' : ''}${fmt(row.vsBaseline, 3)} ms` : `${row.vsBaseline.toFixed(2)}×`;
  const peer = row.vsBestPeer === undefined ? '—' : `${row.vsBestPeer.toFixed(2)}×${row.additive ? ' (added)' : ''}`;
  return {
    median: `${fmt(row.median)} ${row.unit}`,
    range: `${fmt(row.min!)}–${fmt(row.max!)}`,
    base,
    peer: row.role === 'peer' && row.vsBestPeer !== undefined && Math.abs(row.vsBestPeer - 1) < 1e-9 ? 'best' : peer,
    cpu: row.cpuSecPerGB === undefined ? '—' : fmt(row.cpuSecPerGB),
    steal: row.stealPercent === undefined ? '—' : `${row.stealPercent.toFixed(1)} %`,
  };
}

export function markdownTable(rows: Row[]): string {
  const lines = ['| system | mode | cipher | metric | median | min–max | vs baseline | vs best peer | CPU s/GB | CPU steal |', '|---|---|---|---|---|---|---|---|---|---|'];
  for (const r of rows) {
    const c = cell(r);
    const median = r.status === 'ok' ? c.median : `**${r.status}**${r.reason ? ` (${r.reason.replace(/\|/g, '/')})` : ''}`;
    lines.push(`| ${r.system} | ${r.mode} | ${r.cipher} | ${r.label} | ${median} | ${c.range} | ${c.base} | ${c.peer} | ${c.cpu} | ${c.steal} |`);
  }
  return lines.join('\n');
}

export function consoleTable(rows: Row[]): string {
  const data = rows.map((r) => {
    const c = cell(r);
    return [r.system, r.mode, r.cipher, r.label, r.status === 'ok' ? c.median : `${r.status}${r.reason ? `: ${r.reason}` : ''}`.slice(0, 70), c.range, c.base, c.peer, c.cpu, c.steal];
  });
  const head = ['system', 'mode', 'cipher', 'metric', 'median', 'min–max', 'vs baseline', 'vs best peer', 'CPU s/GB', 'steal'];
  const widths = head.map((h, i) => Math.max(h.length, ...data.map((d) => d[i]!.length)));
  const line = (cols: string[]) => cols.map((c, i) => c.padEnd(widths[i]!)).join('  ');
  return [line(head), widths.map((w) => '-'.repeat(w)).join('  '), ...data.map(line)].join('\n');
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** Horizontal bars, one panel per metric: `panels` = [title, rows]. Hand-written SVG, no dependencies. */
export function svgChart(title: string, panels: Array<{ title: string; unit: string; rows: Row[] }>): string {
  const W = 900;
  const labelW = 330;
  const barMax = W - labelW - 150;
  const barH = 18;
  const gap = 6;
  let y = 40;
  const parts: string[] = [];
  const color = (r: Row) => (r.role === 'dshield' ? '#2f6fdf' : r.role === 'baseline' ? '#9a9a9a' : r.role === 'reference' ? '#c9a227' : '#d2553c');
  for (const p of panels) {
    parts.push(`<text x="10" y="${y + 14}" font-size="15" font-weight="bold">${esc(p.title)}</text>`);
    y += 26;
    const measured = p.rows.filter((r) => r.status === 'ok' && r.median !== undefined);
    const max = Math.max(1e-9, ...measured.map((r) => r.max ?? r.median!));
    for (const r of p.rows) {
      const label = `${r.system}${r.cipher !== '—' ? ` · ${r.cipher}` : ''}`;
      parts.push(`<text x="${labelW - 8}" y="${y + 13}" font-size="12" text-anchor="end">${esc(label)}</text>`);
      if (r.status === 'ok' && r.median !== undefined) {
        const w = Math.max(1, (r.median / max) * barMax);
        parts.push(`<rect x="${labelW}" y="${y}" width="${w.toFixed(1)}" height="${barH}" fill="${color(r)}"/>`);
        // min–max whisker
        const x1 = labelW + (r.min! / max) * barMax;
        const x2 = labelW + (r.max! / max) * barMax;
        parts.push(`<line x1="${x1.toFixed(1)}" y1="${y + barH / 2}" x2="${x2.toFixed(1)}" y2="${y + barH / 2}" stroke="#222" stroke-width="1"/>`);
        parts.push(`<text x="${labelW + w + 6}" y="${y + 13}" font-size="12">${esc(`${fmt(r.median)} ${p.unit}`)}</text>`);
      } else {
        parts.push(`<text x="${labelW + 4}" y="${y + 13}" font-size="12" fill="#888">${esc(r.status)}</text>`);
      }
      y += barH + gap;
    }
    y += 14;
  }
  const legend = [
    ['#9a9a9a', 'baseline (no VPN)'],
    ['#d2553c', 'established peer'],
    ['#c9a227', 'plain SOCKS5 (no crypto)'],
    ['#2f6fdf', 'dshield'],
  ]
    .map(([c, t], i) => `<rect x="${10 + i * 210}" y="${y}" width="12" height="12" fill="${c}"/><text x="${28 + i * 210}" y="${y + 11}" font-size="12">${t}</text>`)
    .join('');
  y += 24;
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${y}" viewBox="0 0 ${W} ${y}" font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n<text x="10" y="22" font-size="17" font-weight="bold">${esc(title)}</text>\n${parts.join('\n')}\n${legend}\n</svg>\n`;
}

export function writeResults(dir: string, files: Record<string, string>): void {
  mkdirSync(dir, { recursive: true });
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, name), text);
}
