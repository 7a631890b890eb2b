/**
 * The pieces of the TUN-mode end-to-end tests (test/tun-*.test.ts): the real
 * dshield CLI, iperf3, curl, dig and ping run inside network namespaces that
 * test/helpers/netns.ts builds, so all traffic stays in namespaces the test
 * made.
 *
 * - `startDshield` runs `node --import tsx bin/dshield.ts --mode M --config F`
 *   inside a namespace (stopped by PID: SIGTERM, then SIGKILL after a bound).
 * - `startWebHost` runs test/fixtures/tun-web-host.ts in the web namespace:
 *   an HTTP server and a DNS responder that log each request's source address.
 * - `snapshotNetns` captures what a TUN client or server may change in a
 *   namespace (routes, rules, links, addresses, nftables, resolv.conf,
 *   forwarding sysctls), so a test can assert it is exactly restored.
 * - `LeakCounter` counts, with an nftables rule in the web namespace, packets
 *   that arrive from the client side by any path.
 */
import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { encodeKey } from '../../core/keys.ts';
import { generateKeyPair } from '../../core/x25519.ts';
import { CLI, ROOT, writeConfig } from './cli.ts';
import { exec, spawnIn, stopChild } from './netns.ts';
import { withTimeout } from './timeout.ts';
import { ProcessOutput } from './output.ts';

/** Tools the TUN end-to-end tests run (besides node). */
export const TUN_E2E_TOOLS = ['ip', 'nft', 'ping', 'iperf3', 'curl', 'dig'];

/** What the web host's DNS responder answers, and for which name. */
export const DNS_TEST_NAME = 'test.dshield.internal';
export const DNS_TEST_ANSWER = '192.0.2.77';
export const WEB_HTTP_PORT = 80;
export const WEB_DNS_PORT = 53;
/** The server's client pool in these tests, and its first address (the server's own). */
export const POOL = '10.66.0.0/24';
export const POOL_PREFIX = '10.66.0.';
/** Where the server listens inside the server namespace (namespaces are private: a fixed port is fine). */
export const SERVER_PORT = 8443;
/** The ws transport's path in these tests. */
export const WS_PATH = '/dsh-tun';

const TSX = import.meta.resolve('tsx');
const WEB_HOST = join(ROOT, 'test', 'fixtures', 'tun-web-host.ts');

/**
 * Why the given transport cannot be tested yet, or undefined. The udp
 * transport is built by a colleague in parallel: until its plugin file
 * exists, its variants report "pending" (exit 77) instead of failing or
 * silently passing.
 */
export function transportPending(transport: string): string | undefined {
  if (transport === 'udp' && !existsSync(join(ROOT, 'plugins', 'transport-udp.ts'))) {
    return 'PENDING: the udp transport (plugins/transport-udp.ts) does not exist yet; the udp TUN tests cannot run';
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Processes inside a namespace

export interface NsProc {
  child: ChildProcess;
  readonly pid: number;
  /** Everything printed so far, stdout and stderr interleaved. */
  output(): string;
  /** The first match of `re` in the output; rejects after `ms` or when the process exits first. */
  waitFor(re: RegExp, ms?: number): Promise<RegExpMatchArray>;
  /** True until the process has exited. */
  running(): boolean;
  /** The exit code (128 + n for a signal), bounded. */
  exited(ms?: number): Promise<number | null>;
  /** SIGTERM, SIGKILL after graceMs; resolves with the exit code once it is gone. */
  stop(graceMs?: number): Promise<number | null>;
  /** SIGKILL at once (a crash); resolves once it is gone. */
  kill(): Promise<void>;
}

export function startInNs(ns: string, cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): NsProc {
  const child = spawnIn(ns, cmd, args, {
    cwd: ROOT,
    env: { ...process.env, FORCE_COLOR: '0', ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const out = new ProcessOutput(`${cmd} in ${ns}`);
  let exitCode: number | null | undefined;
  const exitPromise = new Promise<number | null>((resolve) => {
    child.once('exit', (code, signal) => {
      exitCode = code ?? (signal ? 128 + signalNumber(signal) : null);
      out.ended(String(exitCode));
      resolve(exitCode);
    });
  });
  const onData = (chunk: Buffer) => {
    if (process.env.DSHIELD_TEST_VERBOSE) process.stderr.write(`[${ns.split('-').pop()} ${cmd.split('/').pop()}] ${chunk}`);
    out.append(chunk.toString());
  };
  child.stdout!.on('data', onData);
  child.stderr!.on('data', onData);

  return {
    child,
    get pid() {
      return child.pid ?? -1;
    },
    output: () => out.text,
    running: () => exitCode === undefined,
    waitFor: (re, ms) => out.waitFor(re, ms),
    exited(ms = 20_000) {
      return withTimeout(exitPromise, ms, `${cmd} in ${ns} to exit; output:\n${out.text}`);
    },
    async stop(graceMs = 10_000) {
      if (exitCode === undefined) await withTimeout(stopChild(child, graceMs), graceMs + 5_000, `${cmd} in ${ns} to stop`);
      return exitPromise;
    },
    async kill() {
      if (exitCode === undefined) {
        try {
          process.kill(-child.pid!, 'SIGKILL');
        } catch {
          child.kill('SIGKILL');
        }
      }
      await withTimeout(exitPromise, 5_000, `${cmd} in ${ns} to die`);
    },
  };
}

function signalNumber(signal: NodeJS.Signals): number {
  return ({ SIGTERM: 15, SIGKILL: 9, SIGINT: 2 } as Record<string, number>)[signal] ?? 0;
}

/** The real CLI inside `ns` with `config` written as JSON into `dir` (relative paths in it are relative to dir). */
export function startDshield(ns: string, mode: 'server' | 'client', dir: string, config: unknown): NsProc {
  mkdirSync(dir, { recursive: true });
  const path = writeConfig(dir, config);
  return startInNs(ns, process.execPath, ['--import', TSX, CLI, '--mode', mode, '--config', path]);
}

/**
 * The transport setting and the addresses for the server (listen) and the
 * client (dial) in the test topology.
 */
export function transportSettings(transport: string, serverIp: string): { transport: unknown; listen: string; dial: string } {
  const listen = `${serverIp}:${SERVER_PORT}`;
  if (transport === 'ws') return { transport: { use: 'ws', path: WS_PATH }, listen, dial: `ws://${listen}${WS_PATH}` };
  return { transport, listen, dial: listen };
}

// ---------------------------------------------------------------------------
// The web host

export interface WebHost {
  proc: NsProc;
  /** Source addresses of HTTP requests so far (only those for `path` when given). */
  httpSources(path?: string): string[];
  /** Source addresses of DNS queries for `name` so far. */
  dnsSources(name?: string): string[];
  stop(): Promise<void>;
}

export async function startWebHost(ns: string, ip: string): Promise<WebHost> {
  const proc = startInNs(ns, process.execPath, [
    '--import',
    TSX,
    WEB_HOST,
    ip,
    String(WEB_HTTP_PORT),
    String(WEB_DNS_PORT),
    DNS_TEST_NAME,
    DNS_TEST_ANSWER,
  ]);
  await proc.waitFor(/^READY$/m, 20_000);
  const lines = (kind: string) =>
    proc
      .output()
      .split('\n')
      .filter((l) => l.startsWith(`${kind} `))
      .map((l) => l.split(' '));
  return {
    proc,
    httpSources: (path) =>
      lines('HTTP')
        .filter((f) => path === undefined || f[3] === path)
        .map((f) => f[1]!),
    dnsSources: (name = DNS_TEST_NAME) => lines('DNS').filter((f) => f[2] === name).map((f) => f[1]!),
    stop: async () => {
      await proc.stop(3_000);
    },
  };
}

// ---------------------------------------------------------------------------
// Tools run from a namespace

export async function pingOk(ns: string, ip: string, count = 3, waitS = 2): Promise<{ ok: boolean; out: string }> {
  const r = await exec(ns, 'ping', ['-n', '-c', String(count), '-W', String(waitS), ip], {
    allowFail: true,
    timeout: (count * waitS + 5) * 1000,
  });
  return { ok: r.code === 0, out: r.stdout + r.stderr };
}

/** curl without any proxy (the environment's proxy variables are removed). */
export async function curlIn(ns: string, url: string, maxTimeS = 10): Promise<{ ok: boolean; body: string; err: string }> {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (/_proxy$/i.test(k)) delete env[k];
  const r = await exec(ns, 'curl', ['-sS', '--fail', '--noproxy', '*', '--max-time', String(maxTimeS), url], {
    allowFail: true,
    timeout: (maxTimeS + 5) * 1000,
    env,
  });
  return { ok: r.code === 0, body: r.stdout, err: r.stderr.trim() };
}

/** `dig +short` for an A record (answer: the records, '' when none came); `server` undefined: the resolver in the namespace's resolv.conf. */
export async function digIn(ns: string, name: string, server?: string, timeS = 2, tries = 2): Promise<{ ok: boolean; answer: string; out: string }> {
  const args = [...(server ? [`@${server}`] : []), name, 'A', '+short', `+time=${timeS}`, `+tries=${tries}`];
  const r = await exec(ns, 'dig', args, { allowFail: true, timeout: (timeS * tries + 5) * 1000 });
  // On a timeout dig +short still prints ";; connection timed out..." on stdout: that is no answer.
  const answer = r.stdout
    .split('\n')
    .filter((l) => l.trim() !== '' && !l.startsWith(';'))
    .join('\n');
  return { ok: r.code === 0, answer, out: (r.stdout + r.stderr).trim() };
}

export interface Iperf3Result {
  bitsPerSecond: number;
  /** Bytes the receiver got. */
  bytesReceived: number;
  /** UDP only: lost datagrams as the receiver saw them, in percent. */
  lostPercent?: number;
  error?: string;
}

/**
 * One iperf3 run from clientNs to `serverIp` in serverNs: a one-shot iperf3
 * server (-1) is started for it and stopped after, so a failed run cannot
 * leave a busy server behind.
 */
export async function iperf3(
  clientNs: string,
  serverNs: string,
  serverIp: string,
  opts: { udp?: boolean; seconds?: number; port: number; bandwidth?: string; length?: number },
): Promise<Iperf3Result> {
  const seconds = opts.seconds ?? 3;
  const server = startInNs(serverNs, 'iperf3', ['-s', '-1', '--forceflush', '-B', serverIp, '-p', String(opts.port)]);
  try {
    await server.waitFor(/Server listening/, 10_000);
    const args = ['-c', serverIp, '-p', String(opts.port), '-t', String(seconds), '-J', '--connect-timeout', '5000'];
    if (opts.udp) args.push('-u', '-b', opts.bandwidth ?? '50M', '-l', String(opts.length ?? 1200));
    const r = await exec(clientNs, 'iperf3', args, { allowFail: true, timeout: (seconds + 20) * 1000 });
    let json: Iperf3Json;
    try {
      json = JSON.parse(r.stdout) as Iperf3Json;
    } catch {
      return { bitsPerSecond: 0, bytesReceived: 0, error: `iperf3 exited ${r.code}: ${(r.stdout + r.stderr).trim().slice(0, 500)}` };
    }
    if (json.error) return { bitsPerSecond: 0, bytesReceived: 0, error: json.error };
    const end = json.end ?? {};
    if (opts.udp) {
      // iperf3 3.12 reports UDP in end.sum (sender's bytes, receiver's loss);
      // newer versions split it into sum_sent / sum_received.
      const rcv = end.sum_received ?? end.sum;
      const lost = rcv?.lost_packets ?? 0;
      const packets = rcv?.packets ?? 0;
      const length = opts.length ?? 1200;
      const bytesReceived = end.sum_received ? end.sum_received.bytes ?? 0 : Math.max(0, packets - lost) * length;
      return {
        bitsPerSecond: (bytesReceived * 8) / (rcv?.seconds || seconds),
        bytesReceived,
        lostPercent: rcv?.lost_percent ?? (packets > 0 ? (100 * lost) / packets : 100),
      };
    }
    return { bitsPerSecond: end.sum_received?.bits_per_second ?? 0, bytesReceived: end.sum_received?.bytes ?? 0 };
  } finally {
    await server.stop(2_000);
  }
}

interface Iperf3Sum {
  bytes?: number;
  bits_per_second?: number;
  seconds?: number;
  lost_packets?: number;
  packets?: number;
  lost_percent?: number;
}
interface Iperf3Json {
  error?: string;
  end?: { sum?: Iperf3Sum; sum_sent?: Iperf3Sum; sum_received?: Iperf3Sum };
}

export function mbit(bitsPerSecond: number): string {
  return `${(bitsPerSecond / 1e6).toFixed(0)} Mbit/s`;
}

// ---------------------------------------------------------------------------
// What a TUN client or server may change in a namespace

export type NetnsSnapshot = Record<string, string>;

/**
 * Routes (all tables), policy rules, links, addresses, the nftables ruleset,
 * forwarding sysctls and /etc/netns/<ns>/resolv.conf of namespace `ns`.
 */
export async function snapshotNetns(ns: string): Promise<NetnsSnapshot> {
  // A fresh link's IPv6 link-local address (and its local route) appears
  // only after duplicate address detection: compare settled states only.
  await eventually(async () => (await exec(ns, 'ip', ['-6', 'addr', 'show', 'tentative'], { allowFail: true })).stdout.trim() === '', 5_000, 100);
  const cmds: Record<string, string[]> = {
    'ip -4 route show table all': ['ip', '-4', 'route', 'show', 'table', 'all'],
    'ip -6 route show table all': ['ip', '-6', 'route', 'show', 'table', 'all'],
    'ip -4 rule': ['ip', '-4', 'rule'],
    'ip -6 rule': ['ip', '-6', 'rule'],
    'ip -br link': ['ip', '-br', 'link'],
    'ip -br addr': ['ip', '-br', 'addr'],
    'nft list ruleset': ['nft', 'list', 'ruleset'],
    sysctls: [
      'sysctl',
      'net.ipv4.ip_forward',
      'net.ipv6.conf.all.forwarding',
      'net.ipv4.conf.all.src_valid_mark',
      'net.ipv6.conf.all.disable_ipv6',
    ],
  };
  const snap: NetnsSnapshot = {};
  await Promise.all(
    Object.entries(cmds).map(async ([name, [cmd, ...args]]) => {
      const r = await exec(ns, cmd!, args, { allowFail: true });
      snap[name] = r.code === 0 ? r.stdout : `(exit ${r.code}) ${r.stderr}`;
    }),
  );
  const resolv = join('/etc/netns', ns, 'resolv.conf');
  snap['/etc/netns/<ns>/resolv.conf'] = existsSync(resolv) ? readFileSync(resolv, 'utf8') : '(absent)';
  return snap;
}

/** '' when equal, else each differing item with its before and after. */
export function diffSnapshots(before: NetnsSnapshot, after: NetnsSnapshot): string {
  const out: string[] = [];
  for (const key of new Set([...Object.keys(before), ...Object.keys(after)])) {
    if (before[key] !== after[key]) out.push(`--- ${key} before:\n${before[key]}\n--- ${key} after:\n${after[key]}`);
  }
  return out.join('\n');
}

/**
 * Polls (bounded) until `ns` is back to `before`: a device's routes leave
 * with the device, which the kernel may finish a moment after the process
 * has exited. Returns the remaining difference ('' when restored).
 */
export async function waitRestored(ns: string, before: NetnsSnapshot, ms = 5_000): Promise<string> {
  const deadline = Date.now() + ms;
  for (;;) {
    const diff = diffSnapshots(before, await snapshotNetns(ns));
    if (diff === '' || Date.now() > deadline) return diff;
    await sleep(250);
  }
}

/** A fingerprint of the host's /etc/resolv.conf (what it is, not just its text). */
export function hostResolvFingerprint(): string {
  try {
    const st = lstatSync('/etc/resolv.conf');
    if (st.isSymbolicLink()) return `symlink -> ${readlinkSync('/etc/resolv.conf')}`;
    const hash = createHash('sha256').update(readFileSync('/etc/resolv.conf')).digest('hex');
    return `file mode ${(st.mode & 0o7777).toString(8)} sha256 ${hash}`;
  } catch {
    return 'absent';
  }
}

/**
 * Whether a client in a namespace may rewrite its /etc/resolv.conf without
 * touching the host's: `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf
 * over /etc/resolv.conf, but where the host file is a symlink
 * (systemd-resolved) it mounts over the link's target, and a client that
 * replaces the link would change the host.
 */
export function netnsResolvIsPrivate(): boolean {
  try {
    return !lstatSync('/etc/resolv.conf').isSymbolicLink();
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------
// Waiting for a TUN client

export interface TunUp {
  /** The TUN device's name in the client namespace. */
  dev: string;
  /** The address the server assigned (without prefix). */
  address: string;
}

/**
 * Polls `ns` (bounded) until a device holds an address from the pool and,
 * when `fullTunnel`, 0.0.0.0/1 routes through it: the client is up.
 */
export async function waitForTunUp(ns: string, proc: NsProc, opts: { ms?: number; fullTunnel?: boolean } = {}): Promise<TunUp> {
  const deadline = Date.now() + (opts.ms ?? 30_000);
  let last = '';
  for (;;) {
    if (!proc.running()) throw new Error(`the client exited (${await proc.exited(1_000)}) before its TUN came up; output:\n${proc.output()}`);
    const r = await exec(ns, 'ip', ['-j', '-4', 'addr', 'show'], { allowFail: true });
    const links = r.code === 0 ? (JSON.parse(r.stdout) as Array<{ ifname: string; addr_info?: Array<{ local: string }> }>) : [];
    const found = links.flatMap((l) => (l.addr_info ?? []).map((a) => ({ dev: l.ifname, address: a.local }))).find((a) => a.address.startsWith(POOL_PREFIX));
    if (found) {
      if (!opts.fullTunnel) return found;
      const routes = await exec(ns, 'ip', ['-4', 'route', 'show', '0.0.0.0/1'], { allowFail: true });
      if (routes.stdout.includes(`dev ${found.dev}`)) return found;
      last = `address ${found.address} on ${found.dev}, but no 0.0.0.0/1 route through it yet`;
    } else {
      last = 'no address from the pool on any device yet';
    }
    if (Date.now() > deadline) throw new Error(`the client's TUN did not come up: ${last}; client output:\n${proc.output()}`);
    await sleep(200);
  }
}

/**
 * Polls (bounded) until the namespace's resolv.conf names `resolver`: the
 * client changes DNS last, after the routes that waitForTunUp sees.
 */
export function waitForDns(ns: string, resolver: string, ms = 10_000): Promise<boolean> {
  const resolv = join('/etc/netns', ns, 'resolv.conf');
  return eventually(async () => existsSync(resolv) && readFileSync(resolv, 'utf8').includes(`nameserver ${resolver}`), ms, 100);
}

/** Polls `check` (bounded) until it returns true; returns its last result. */
export async function eventually(check: () => Promise<boolean>, ms: number, stepMs = 250): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check()) return true;
    if (Date.now() > deadline) return false;
    await sleep(stepMs);
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

// ---------------------------------------------------------------------------
// Counting packets that reach the web host

/**
 * An nftables counter in the web namespace for packets arriving from the
 * client side (the client LAN, the TUN pool, the client LAN's IPv6 prefix)
 * by any path, counted at prerouting before anything else can drop them.
 * Tunnelled traffic arrives masqueraded (from the server's address) and is
 * not counted: only a leak is.
 */
export class LeakCounter {
  private static readonly TABLE = 'dshtest_leak';

  constructor(
    private readonly ns: string,
    private readonly sources4: string[],
    private readonly sources6: string[],
  ) {}

  /** (Re)creates the table, so the counters start at 0. */
  async reset(): Promise<void> {
    const t = LeakCounter.TABLE;
    const script = [
      `table inet ${t}`,
      `delete table inet ${t}`,
      `table inet ${t} {`,
      '  chain pre {',
      '    type filter hook prerouting priority -400; policy accept;',
      `    ip saddr { ${this.sources4.join(', ')} } counter`,
      `    ip6 saddr { ${this.sources6.join(', ')} } counter`,
      '  }',
      '}',
      '',
    ].join('\n');
    await exec(this.ns, 'nft', ['-f', '-'], { input: script });
  }

  /** Packets counted since the last reset (IPv4 and IPv6 together). */
  async packets(): Promise<number> {
    const { stdout } = await exec(this.ns, 'nft', ['-j', 'list', 'table', 'inet', LeakCounter.TABLE]);
    const items = (JSON.parse(stdout) as { nftables: Array<{ rule?: { expr: Array<{ counter?: { packets: number } }> } }> }).nftables;
    let n = 0;
    for (const item of items) for (const e of item.rule?.expr ?? []) n += e.counter?.packets ?? 0;
    return n;
  }
}

// ---------------------------------------------------------------------------
// Configs

export interface TestKeys {
  privateKey: string;
  publicKey: string;
}

export function newKeys(): TestKeys {
  const kp = generateKeyPair();
  return { privateKey: encodeKey(kp.privateKey), publicKey: encodeKey(kp.publicKey) };
}

const logging = () => [{ use: 'console', level: process.env.DSHIELD_TEST_VERBOSE ? 'debug' : 'info' }];

/**
 * A TUN server's config for the test topology. Relative paths (the leases
 * file, the state dir) are relative to the config's own directory, which the
 * test keeps across restarts of the same server.
 */
export function serverTunConfig(opts: {
  transport: string;
  listenIp: string;
  key: TestKeys;
  clients: Array<{ name: string; publicKey: string }>;
  /** server.egress.allow */
  allow: string[];
  dns: string[];
  tun?: Record<string, unknown>;
}): unknown {
  const t = transportSettings(opts.transport, opts.listenIp);
  return {
    transport: t.transport,
    logging: logging(),
    server: {
      listen: t.listen,
      privateKey: opts.key.privateKey,
      clients: opts.clients,
      egress: { allow: opts.allow },
      handshakeTimeout: 5_000,
      tun: {
        subnet: POOL,
        nat: true,
        dns: opts.dns,
        clientToClient: false,
        leasesFile: 'keys/leases.json',
        mtu: 1420,
        stateDir: 'state',
        ...opts.tun,
      },
    },
  };
}

/** A TUN client's config (no SOCKS5 or HTTP proxy: the TUN captures everything). */
export function clientTunConfig(opts: {
  transport: string;
  serverIp: string;
  serverPublicKey: string;
  key: TestKeys;
  tun: Record<string, unknown>;
}): unknown {
  const t = transportSettings(opts.transport, opts.serverIp);
  return {
    transport: t.transport,
    logging: logging(),
    client: {
      server: t.dial,
      serverPublicKey: opts.serverPublicKey,
      privateKey: opts.key.privateKey,
      socks: false,
      http: false,
      handshakeTimeout: 5_000,
      tun: { stateDir: 'state', ...opts.tun },
    },
  };
}

/** Journal files a run left in a state dir (a clean exit leaves none). */
export function stateLeftovers(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).filter((f) => f.endsWith('.json')) : [];
}
