/**
 * dshield itself, as real CLI processes (`node --import tsx bin/dshield.ts`):
 * the server in the server namespace, the client in the client namespace,
 * with fresh keys and a config written per run.
 *
 *   proxy mode   the client's SOCKS5 proxy on 127.0.0.1:1080 in the client namespace
 *                (1080 + slot, and the server's port + slot, side by side with the others)
 *   TUN mode     server.tun (pool 10.66.0.0/24, its own forwarding and NAT) and
 *                client.tun (everything routed through its TUN, DNS left alone)
 *
 * TUN mode and the udp transport are being built while this bench is written:
 * `tunAvailability` says why a combination cannot run (a missing plugin
 * file), and a start that fails (the smoke test: the TUN comes up, a request
 * reaches the web host) is recorded as "not available yet" with the reason —
 * never as a number.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeKey } from '../core/keys.ts';
import { loadLibsodiumAesGcm, loadLibsodiumChaCha } from '../core/libsodium-aead.ts';
import { generateKeyPair } from '../core/x25519.ts';
import { CLI, ROOT } from '../test/helpers/cli.ts';
import { startIn, type BenchProc } from './proc.ts';
import { socksPort, waitForPort, type Running, type SystemSpec } from './peers.ts';
import { PORTS } from './settings.ts';
import { exec, type BenchTopology } from './topology.ts';

const TSX = import.meta.resolve('tsx');
export const TUN_POOL = '10.66.0.0/24';
const WS_PATH = '/bench';

export interface Keys {
  privateKey: string;
  publicKey: string;
}
export function newKeys(): Keys {
  const k = generateKeyPair();
  return { privateKey: encodeKey(k.privateKey), publicKey: encodeKey(k.publicKey) };
}

function transportSetting(transport: string, serverIp: string, slot: number): { transport: unknown; listen: string; dial: string } {
  const listen = `${serverIp}:${PORTS.dshield + slot}`;
  if (transport === 'ws') return { transport: { use: 'ws', path: WS_PATH }, listen, dial: `ws://${listen}${WS_PATH}` };
  return { transport, listen, dial: listen };
}

export interface DshieldConfigOptions {
  transport: string;
  cipher: string;
  serverIp: string;
  webSubnet: string;
  /** The web host: also the resolver the server names (clients here leave DNS alone: tun.dns false). */
  webIp: string;
  server: Keys;
  clients: Array<{ name: string; keys: Keys }>;
  tun: boolean;
  work: string;
  /** Moves the server's port and the client's SOCKS5 port up by this much (SystemSpec.start's slot); 0 when absent. */
  slot?: number;
}

export function serverConfig(o: DshieldConfigOptions): unknown {
  const t = transportSetting(o.transport, o.serverIp, o.slot ?? 0);
  return {
    transport: t.transport,
    cipher: o.cipher,
    logging: [{ use: 'console', level: 'warn' }],
    server: {
      listen: t.listen,
      privateKey: o.server.privateKey,
      clients: o.clients.map((c) => ({ name: c.name, publicKey: c.keys.publicKey })),
      clientsFile: join(o.work, 'clients.json'),
      // The web host's subnet is private: the default egress policy would refuse it.
      egress: { allow: [o.webSubnet] },
      handshakeTimeout: 5_000,
      ...(o.tun ? { tun: { subnet: TUN_POOL, nat: true, dns: [o.webIp], leasesFile: join(o.work, 'leases.json'), stateDir: join(o.work, 'server-state') } } : {}),
    },
  };
}

export function clientConfig(o: DshieldConfigOptions, keys: Keys): unknown {
  const t = transportSetting(o.transport, o.serverIp, o.slot ?? 0);
  return {
    transport: t.transport,
    cipher: o.cipher,
    logging: [{ use: 'console', level: 'warn' }],
    client: {
      server: t.dial,
      serverPublicKey: o.server.publicKey,
      privateKey: keys.privateKey,
      socks: o.tun ? false : `127.0.0.1:${socksPort(o.slot)}`,
      http: false,
      handshakeTimeout: 5_000,
      ...(o.tun ? { tun: { dns: false, stateDir: join(o.work, 'client-state') } } : {}),
    },
  };
}

/** DSHIELD_BENCH_CPU_PROF=dir: every dshield process writes a V8 CPU profile (100 µs samples) there when it exits. */
const PROFILE_ARGS = process.env.DSHIELD_BENCH_CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${process.env.DSHIELD_BENCH_CPU_PROF}`, '--cpu-prof-interval', '100'] : [];

/** Start the CLI in `ns` with `config` (JSON) written into `dir`; `pin` = taskset CPU list. */
export function startCliIn(ns: string, name: string, mode: 'server' | 'client', dir: string, config: unknown, pin?: string): BenchProc {
  mkdirSync(dir, { recursive: true });
  const path = join(dir, `${mode}.config.json`);
  writeFileSync(path, JSON.stringify(config, null, 2), { mode: 0o600 });
  const argv = [process.execPath, ...PROFILE_ARGS, '--import', TSX, CLI, '--mode', mode, '--config', path];
  return pin ? startIn(ns, name, 'taskset', ['-c', pin, ...argv], { cwd: ROOT }) : startIn(ns, name, argv[0]!, argv.slice(1), { cwd: ROOT });
}

/** Which library seals dshield's small records here (core/libsodium-aead.ts): the same loaders the cipher plugins use. */
function smallRecords(cipher: string): string {
  const aes = cipher === 'aes-256-gcm';
  if ((aes ? loadLibsodiumAesGcm() : loadLibsodiumChaCha()) !== null) return 'records under 4 KiB sealed by the system libsodium';
  return `records under 4 KiB sealed by ${aes ? 'OpenSSL' : 'sodium-native'}: no system libsodium`;
}

/** Why dshield TUN mode over `transport` cannot run in this checkout, or undefined. */
export function tunAvailability(transport: string): string | undefined {
  const need = ['plugins/inbound-tun.ts', ...(transport === 'udp' ? ['plugins/transport-udp.ts'] : [])];
  const missing = need.filter((f) => !existsSync(join(ROOT, f)));
  return missing.length ? `${missing.join(' and ')} not in this checkout` : undefined;
}

export function dshieldProxy(transport: 'tcp' | 'ws', cipher: string): SystemSpec {
  return {
    id: `dshield-proxy/${transport}/${cipher}`,
    system: `dshield SOCKS5 over ${transport}`,
    mode: 'proxy',
    cipher,
    role: 'dshield',
    expectSource: 'server',
    needs: [],
    async start(bt, work, slot = 0) {
      const o = { ...options(bt, work, transport, cipher, false), slot };
      const socks = `127.0.0.1:${socksPort(slot)}`;
      const procs: BenchProc[] = [];
      try {
        const server = startCliIn(bt.topo.ns.server, `dshield-server(${transport})`, 'server', join(work, 'server'), serverConfig(o));
        procs.push(server);
        await server.waitFor(/listening on \S+/, 30_000);
        const client = startCliIn(bt.topo.ns.client, `dshield-client(${transport})`, 'client', join(work, 'client'), clientConfig(o, o.clients[0]!.keys));
        procs.push(client);
        await client.waitFor(/proxy ready: socks5:\/\/\S+/, 30_000);
        await waitForPort(bt, bt.topo.ns.client, '127.0.0.1', socksPort(slot), client);
      } catch (err) {
        await Promise.allSettled(procs.map((p) => p.stop()));
        throw err;
      }
      return {
        pids: procs.map((p) => p.pid),
        socks,
        curlProxy: ['--socks5-hostname', socks],
        notes: [`dshield CLI, ${transport}, ${cipher}`, smallRecords(cipher)],
        stop: async () => {
          await Promise.allSettled(procs.map((p) => p.stop()));
        },
      };
    },
  };
}

function options(bt: BenchTopology, work: string, transport: string, cipher: string, tun: boolean): DshieldConfigOptions {
  return {
    transport,
    cipher,
    serverIp: bt.topo.addr.serverClientSide,
    webSubnet: '10.200.2.0/24',
    webIp: bt.webIp,
    server: newKeys(),
    clients: [{ name: 'bench', keys: newKeys() }],
    tun,
    work,
  };
}

export function dshieldTun(transport: 'udp' | 'tcp' | 'ws', cipher: string): SystemSpec {
  return {
    id: `dshield-tun/${transport}/${cipher}`,
    system: `dshield TUN over ${transport}`,
    mode: 'tun',
    cipher,
    role: 'dshield',
    expectSource: 'server',
    needs: [],
    async start(bt, work): Promise<Running> {
      const why = tunAvailability(transport);
      if (why) throw new NotAvailable(why);
      const o = options(bt, work, transport, cipher, true);
      const procs: BenchProc[] = [];
      try {
        const server = startCliIn(bt.topo.ns.server, `dshield-server(tun ${transport})`, 'server', join(work, 'server'), serverConfig(o));
        procs.push(server);
        await server.waitFor(/listening on \S+/, 30_000);
        const client = startCliIn(bt.topo.ns.client, `dshield-client(tun ${transport})`, 'client', join(work, 'client'), clientConfig(o, o.clients[0]!.keys));
        procs.push(client);
        await client.waitFor(/TUN ready: \S+/, 40_000);
        const route = (await exec(bt.topo.ns.client, 'ip', ['route', 'get', bt.webIp])).stdout;
        if (route.includes(bt.topo.dev.client)) throw new Error(`the client's TUN is up but the web host is still routed around it: ${route.trim()}`);
      } catch (err) {
        await Promise.allSettled(procs.map((p) => p.stop()));
        throw new NotAvailable(firstLine(err));
      }
      return {
        pids: procs.map((p) => p.pid),
        notes: [`dshield CLI, TUN over ${transport}, ${cipher}`, smallRecords(cipher)],
        stop: async () => {
          await Promise.allSettled(procs.map((p) => p.stop()));
        },
      };
    },
  };
}

/** A system that cannot run in this checkout yet (recorded as such, not as a failure). */
export class NotAvailable extends Error {}

function firstLine(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  const lines = text.split('\n').map((l) => l.trim()).filter(Boolean);
  // The useful line of a CLI failure is its "dshield: ..." error, when it printed one.
  return (lines.find((l) => /^dshield: /.test(l)) ?? lines[0] ?? 'unknown error').slice(0, 300);
}
