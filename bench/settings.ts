/**
 * What one `npm run bench` does, from the environment:
 *
 *   DSHIELD_BENCH_RUNS=3       runs per measurement (the median is reported; at least 1)
 *   DSHIELD_BENCH_QUICK=1      short iperf3 runs, 64 MiB proxy transfers, smaller scale tests
 *   DSHIELD_BENCH_ONLY=tun,proxy,scale   sections to run (default: all)
 *   DSHIELD_BENCH_SYSTEMS=wireguard,openvpn,dshield,...   only systems whose id contains one of these
 *                              (the plain baseline always runs)
 *   DSHIELD_BENCH_NO_INSTALL=1 never call apt-get (missing peers are skipped with a line saying so)
 *   DSHIELD_BENCH_OUT=dir      where results go (default bench/results)
 *   DSHIELD_BENCH_CPU_PROF=dir every dshield process writes a V8 CPU profile there on exit
 */
import { fileURLToPath } from 'node:url';

const env = process.env;
export const QUICK = env.DSHIELD_BENCH_QUICK === '1' || env.DSHIELD_BENCH_QUICK === 'true';
export const RUNS = Math.max(1, Math.floor(Number(env.DSHIELD_BENCH_RUNS ?? 3)) || 3);
export const SECTIONS = new Set((env.DSHIELD_BENCH_ONLY ?? 'tun,proxy,scale').split(',').map((s) => s.trim()));
const systems = (env.DSHIELD_BENCH_SYSTEMS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
export const NO_INSTALL = env.DSHIELD_BENCH_NO_INSTALL === '1';
export const OUT_DIR = env.DSHIELD_BENCH_OUT ?? fileURLToPath(new URL('./results/', import.meta.url));

/** True when the system with this id is selected (the baseline always is). */
export function wanted(id: string): boolean {
  return id === 'plain' || systems.length === 0 || systems.some((s) => id.includes(s));
}

export const SETTINGS = {
  /** Seconds per iperf3 TCP run. */
  tcpSeconds: QUICK ? 3 : 6,
  /** Seconds per iperf3 UDP step of the rate search. */
  udpSeconds: QUICK ? 2 : 3,
  /** Steps of the UDP rate search after the unlimited probe. */
  udpSteps: QUICK ? 3 : 5,
  pings: QUICK ? 50 : 200,
  /** Probes per run of the relay-hop floor (bench/hop-floor.ts), 10 ms apart as the pings. */
  hopProbes: QUICK ? 100 : 300,
  /** Sequential 1 KiB requests per run. */
  requests: 200,
  /** Bytes per proxy download/upload. */
  proxyBytes: (QUICK ? 64 : 1024) * 1024 * 1024,
  // The target is stated at 10,000: quick mode measures there too (about a minute).
  idleStreams: 10_000,
  activeStreams: 1_000,
  activeSeconds: QUICK ? 5 : 10,
  handshakeSeconds: QUICK ? 4 : 8,
  /**
   * A first handshake run that is not counted: the server's first seconds
   * compile its handshake path (V8's optimizing compiler runs on threads of
   * the same process, so that work lands in the CPU time measured).
   */
  handshakeWarmupSeconds: QUICK ? 2 : 4,
} as const;

/** Fixed ports inside the namespaces (each namespace is private to this run). */
export const PORTS = { http: 80, socks: 1080, idle: 9001, echo: 9002, iperf: 5201, dshield: 8443, wireguard: 51820, openvpn: 1194, shadowsocks: 8388, microsocks: 1081, hopC: 9003, hopNode: 9004, hopProbe: 9005, hopNodeLoop: 9006, hopNodeUring: 9007, relay: 9008 } as const;
