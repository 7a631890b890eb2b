/**
 * The relay-hop floor: what one user-space hop costs on this machine, in C
 * and in Node, with no VPN work in it.
 *
 * Why: a ping through any TUN VPN wakes four relays on its round trip
 * (client TUN -> socket, server socket -> TUN, server TUN -> socket, client
 * socket -> TUN), each idle for the 10 ms between pings. How much a woken
 * Node process costs over a woken C process, times four, is a floor under
 * what a Node VPN adds to a ping beyond a C VPN such as OpenVPN, whatever
 * its code does. This measures that floor in the same run as the targets.
 *
 *   client ns: probe (bench/drivers/udp-hop.ts) ──UDP── server ns: echo
 *
 * The probe sends 84-byte datagrams one at a time, 10 ms after each answer
 * (ping's spacing), to each echo in turn, run after run:
 *   - socat (C): UDP4-LISTEN + PIPE, a read and a write per datagram;
 *   - node:dgram: the datagram sent straight back from 'message', the least
 *     a Node relay on the event loop does; run under tsx like dshield;
 *   - a Node loop that never returns to the event loop (poll, recvfrom and
 *     sendto through koffi): the least any Node process does per packet;
 *   - the same loop through io_uring (drivers/uring-echo.ts): two crossings
 *     into the kernel per datagram instead of four, the lever a Node VPN
 *     would pull to cross fewer times (skipped where io_uring is not allowed).
 * The same probe times them all, so its own cost cancels out: a node row's
 * "added" column (over socat, the baseline of this metric) is the floor
 * per hop, and the smallest is the floor the report quotes.
 */
import { fileURLToPath } from 'node:url';
import { ROOT } from '../test/helpers/cli.ts';
import { hasTool } from '../test/helpers/netns.ts';
import { startIn, type BenchProc } from './proc.ts';
import { finish, type Row } from './report.ts';
import { PORTS, RUNS, SETTINGS } from './settings.ts';
import type { BenchTopology } from './topology.ts';

const TSX = import.meta.resolve('tsx');
const DRIVER = fileURLToPath(new URL('./drivers/udp-hop.ts', import.meta.url));
const INTERVAL_MS = 10;
/** A probe run may lose a few datagrams (1 s each); more means the hop is broken. */
const MIN_ANSWERED = 0.95;

const HOP_METRIC = 'hop-rtt';
const LABEL = 'UDP echo RTT through one relay hop (84 B, 10 ms apart)';

interface Echo {
  id: string;
  system: string;
  role: Row['role'];
  port: number;
  start(bt: BenchTopology): BenchProc;
}

const ECHOES: Echo[] = [
  {
    id: 'hop/socat',
    system: 'relay hop: socat (C)',
    role: 'baseline',
    port: PORTS.hopC,
    start: (bt) => startIn(bt.topo.ns.server, 'socat-echo', 'socat', [`UDP4-LISTEN:${PORTS.hopC},reuseaddr`, 'PIPE']),
  },
  {
    id: 'hop/node',
    system: 'relay hop: node:dgram',
    role: 'reference',
    port: PORTS.hopNode,
    start: (bt) => startIn(bt.topo.ns.server, 'node-echo', process.execPath, ['--import', TSX, DRIVER, 'echo', String(PORTS.hopNode)], { cwd: ROOT }),
  },
  {
    id: 'hop/node-loop',
    system: 'relay hop: Node, no event loop',
    role: 'reference',
    port: PORTS.hopNodeLoop,
    start: (bt) => startIn(bt.topo.ns.server, 'node-loop-echo', process.execPath, ['--import', TSX, DRIVER, 'loop', String(PORTS.hopNodeLoop)], { cwd: ROOT }),
  },
  {
    id: 'hop/node-uring',
    system: 'relay hop: Node, io_uring',
    role: 'reference',
    port: PORTS.hopNodeUring,
    start: (bt) => startIn(bt.topo.ns.server, 'node-uring-echo', process.execPath, ['--import', TSX, DRIVER, 'uring', String(PORTS.hopNodeUring)], { cwd: ROOT }),
  },
];

function rowOf(echo: Echo, runs: number[], status: Row['status'], reason?: string): Row {
  const row: Row = {
    section: 'tun',
    id: echo.id,
    system: echo.system,
    mode: 'UDP echo',
    cipher: '—',
    role: echo.role,
    metric: HOP_METRIC,
    label: LABEL,
    unit: 'ms',
    better: 'lower',
    additive: true,
    runs,
    status,
    reason,
  };
  return status === 'ok' ? finish(row) : row;
}

async function probe(bt: BenchTopology, port: number): Promise<number> {
  const host = bt.topo.addr.serverClientSide;
  const p = startIn(bt.topo.ns.client, 'hop-probe', process.execPath, ['--import', TSX, DRIVER, 'probe', host, String(port), String(SETTINGS.hopProbes), String(INTERVAL_MS), String(PORTS.hopProbe)], { cwd: ROOT });
  try {
    const m = await p.waitFor(/^RESULT (.*)$/m, SETTINGS.hopProbes * (INTERVAL_MS + 1000) + 30_000);
    const r = JSON.parse(m[1]!) as { answered: number; count: number; mean: number };
    if (r.answered < r.count * MIN_ANSWERED) throw new Error(`only ${r.answered} of ${r.count} probes answered`);
    return r.mean;
  } finally {
    await p.stop();
  }
}

/** Every echo, RUNS probe runs each, alternating; rows for the TUN section. */
export async function runHopFloor(bt: BenchTopology): Promise<Row[]> {
  if (!hasTool('socat')) return ECHOES.map((e) => rowOf(e, [], 'skipped', 'socat not installed'));
  const procs: BenchProc[] = [];
  const runs = new Map<string, number[]>(ECHOES.map((e) => [e.id, []]));
  /** Echoes that cannot run on this system (io_uring not allowed), and why. */
  const unavailable = new Map<string, string>();
  try {
    for (const echo of ECHOES) procs.push(echo.start(bt));
    // socat prints nothing when ready; the node echoes say so. A datagram sent before socat listens is left out after 1 s.
    for (const [i, p] of procs.entries()) {
      if (i === 0) continue;
      const said = await p.waitFor(/^(READY|UNAVAILABLE (.*))$/m, 30_000);
      if (said[2] !== undefined) unavailable.set(ECHOES[i]!.id, said[2]);
    }
    for (let run = 0; run < RUNS; run++) {
      for (const echo of ECHOES) if (!unavailable.has(echo.id)) runs.get(echo.id)!.push(await probe(bt, echo.port));
    }
  } catch (err) {
    const why = (err as Error).message.split('\n')[0]!;
    console.log(`  relay-hop floor: failed — ${why}`);
    return ECHOES.map((e) => rowOf(e, [], 'failed', why));
  } finally {
    for (const p of procs) await p.stop();
  }
  const rows = ECHOES.map((e) => (unavailable.has(e.id) ? rowOf(e, [], 'skipped', unavailable.get(e.id)) : rowOf(e, runs.get(e.id)!, 'ok')));
  console.log(`  relay-hop floor: ${rows.map((r) => `${r.system} ${r.status === 'ok' ? `${r.runs.map((v) => v.toFixed(3)).join('/')} ms` : `${r.status} (${r.reason})`}`).join(', ')}`);
  return rows;
}
