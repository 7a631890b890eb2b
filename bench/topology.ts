/**
 * The bench's hosts: test/helpers/netns.ts builds client — server — web
 * (unique names, removed on any exit, Ctrl+C included), and this adds what
 * every system is measured against: the web host (bench/web-host.ts, whose
 * log names each request's source address), an iperf3 server beside it, and
 * the server namespace's switches (IP forwarding, masquerading of a tunnel's
 * subnet toward the web host).
 *
 *   client 10.200.1.2 ── 10.200.1.1 server 10.200.2.1 ── 10.200.2.2 web
 */
import { fileURLToPath } from 'node:url';
import { createTopology, exec, run, writeNetnsEtc, type Topology } from '../test/helpers/netns.ts';
import { startIn, type BenchProc } from './proc.ts';
import { PORTS } from './settings.ts';

const TSX = import.meta.resolve('tsx');
const WEB_HOST = fileURLToPath(new URL('./web-host.ts', import.meta.url));
const NAT_TABLE = 'bench_nat';

export interface BenchTopology {
  topo: Topology;
  web: BenchProc;
  iperf: BenchProc;
  /** The web host's address as clients use it. */
  webIp: string;
  /** Source addresses of HTTP requests whose path contains `marker`. */
  sourcesOf(marker: string): string[];
  /** Turn IPv4 forwarding in the server namespace on or off (the baseline and kernel peers need it on). */
  forwarding(on: boolean): Promise<void>;
  /** Masquerade `subnet` out of the server's web-side interface (a tunnel's addresses); undone by unmasquerade. */
  masquerade(subnet: string): Promise<void>;
  unmasquerade(): Promise<void>;
  cleanup(): void;
}

export async function createBenchTopology(): Promise<BenchTopology> {
  const topo = await createTopology();
  try {
    // Nothing here should touch the host's resolver file, whatever a client does with DNS.
    writeNetnsEtc(topo.ns.client, { 'resolv.conf': 'nameserver 10.200.2.2\n' });
    const web = startIn(topo.ns.web, 'web', process.execPath, ['--import', TSX, WEB_HOST, topo.addr.web, String(PORTS.http), String(PORTS.idle), String(PORTS.echo)]);
    const iperf = startIn(topo.ns.web, 'iperf3-server', 'iperf3', ['-s', '--forceflush', '-B', topo.addr.web, '-p', String(PORTS.iperf)]);
    await web.waitFor(/^READY$/m, 30_000);
    await iperf.waitFor(/Server listening/, 10_000);
    // Larger socket buffers for every system alike (the kernel defaults cap UDP bursts).
    // The scale test opens 10,000 connections to one port per run, several runs in a row: with
    // the default port range and TIME_WAIT rules the server namespace ran out of source ports
    // (SOCKS5 0x04 from EADDRNOTAVAIL), so every namespace gets a wide range and TIME_WAIT reuse.
    for (const ns of Object.values(topo.ns)) {
      await exec(ns, 'sysctl', ['-qw', 'net.core.rmem_max=8388608', 'net.core.wmem_max=8388608'], { allowFail: true });
      await exec(ns, 'sysctl', ['-qw', 'net.ipv4.ip_local_port_range=1024 65535', 'net.ipv4.tcp_tw_reuse=1', 'net.core.somaxconn=16384'], { allowFail: true });
    }
    const bt: BenchTopology = {
      topo,
      web,
      iperf,
      webIp: topo.addr.web,
      sourcesOf(marker) {
        return [...web.output().matchAll(/^HTTP (\S+) \S+ (\S+)$/gm)].filter((m) => m[2]!.includes(marker)).map((m) => m[1]!.replace(/^::ffff:/, ''));
      },
      async forwarding(on) {
        await exec(topo.ns.server, 'sysctl', ['-qw', `net.ipv4.ip_forward=${on ? 1 : 0}`]);
      },
      async masquerade(subnet) {
        const script = `table ip ${NAT_TABLE} {\n chain post {\n  type nat hook postrouting priority srcnat; policy accept;\n  ip saddr ${subnet} oifname "${topo.dev.serverWebSide}" masquerade\n }\n}\n`;
        await bt.unmasquerade();
        await exec(topo.ns.server, 'nft', ['-f', '-'], { input: script });
      },
      async unmasquerade() {
        await exec(topo.ns.server, 'nft', ['delete', 'table', 'ip', NAT_TABLE], { allowFail: true });
      },
      cleanup: () => topo.cleanup(),
    };
    return bt;
  } catch (err) {
    topo.cleanup();
    throw err;
  }
}

/** Run a command in a namespace, for peers' setup (ip, wg, ...). Rejects with its stderr. */
export async function nsRun(ns: string, cmd: string, args: string[], input?: string): Promise<string> {
  return (await exec(ns, cmd, args, { input, timeout: 15_000 })).stdout;
}

export { exec, run };
