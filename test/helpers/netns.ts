/**
 * Network namespaces for tests that need root: a topology the test builds
 * itself, always removed afterwards, so traffic only goes to addresses inside
 * namespaces this run created.
 *
 *   client (10.200.1.2) --veth-- (10.200.1.1) server (10.200.2.1) --veth-- (10.200.2.2) web
 *
 * - Names are unique per run ("dsh" + 6 random hex + role), so concurrent runs
 *   never collide; addresses repeat across runs but live in separate namespaces.
 * - The client's and web's default routes point at the server; the server's
 *   net.ipv4.ip_forward is 0 (sysctls like that one are per namespace), so the
 *   client cannot reach web until something in the server turns forwarding on.
 * - IPv6 too: fd00:200:1::/64 and fd00:200:2::/64, same host numbers, forwarding off.
 * - `cleanup()` kills what was started (by PID), deletes the namespaces (which
 *   removes their veths, TUN devices and nftables rules) and /etc/netns/<name>.
 *   It is registered for process exit and SIGINT/SIGTERM as well, so a failing
 *   or interrupted test leaves nothing behind (SIGKILL of the test is the one exception).
 *
 * `ip netns exec NAME` runs a command in the namespace and, when
 * /etc/netns/NAME/resolv.conf exists, in a private mount namespace where that
 * file is bind-mounted over /etc/resolv.conf: `writeNetnsEtc` uses that so DNS
 * tests never see (or change) the host's resolver file.
 */
import { execFile, execFileSync, spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, mkdirSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export const SKIP_EXIT_CODE = 77;
const ETC_NETNS = '/etc/netns';

export interface ExecResult {
  stdout: string;
  stderr: string;
  /** Exit code (null when killed by a signal). */
  code: number | null;
}

export interface ExecOptions {
  /** Milliseconds before the command is killed (default 10 s). */
  timeout?: number;
  /** Resolve with the non-zero code instead of rejecting. */
  allowFail?: boolean;
  /** Written to the command's stdin. */
  input?: string;
  env?: NodeJS.ProcessEnv;
}

/** The tools the netns tests use; `canRunNetns(tools)` checks those given. */
export const DEFAULT_TOOLS = ['ip', 'nft', 'ping'];

/** Which Debian package provides each tool (for the skip message). */
const PACKAGE_OF: Record<string, string> = {
  ip: 'iproute2',
  nft: 'nftables',
  ping: 'iputils-ping',
  iperf3: 'iperf3',
  curl: 'curl',
  dig: 'dnsutils',
  unshare: 'util-linux',
  tc: 'iproute2',
};

/** True when `tool` is an executable on PATH (or the usual sbin/bin directories). */
export function hasTool(tool: string): boolean {
  for (const dir of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
    try {
      accessSync(join(dir, tool), constants.X_OK);
      return true;
    } catch {
      // keep looking
    }
  }
  return false;
}

/**
 * Why netns tests cannot run here, or undefined when they can: needs Linux,
 * root, /dev/net/tun and the given tools.
 */
export function canRunNetns(tools: string[] = DEFAULT_TOOLS): string | undefined {
  if (process.platform !== 'linux') return `needs Linux (this is ${process.platform})`;
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'needs root (network namespaces, TUN devices)';
  try {
    accessSync('/dev/net/tun', constants.R_OK | constants.W_OK);
  } catch {
    return 'needs /dev/net/tun (modprobe tun; in a container: --device /dev/net/tun)';
  }
  const missing = tools.filter((t) => !hasTool(t));
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((t) => PACKAGE_OF[t] ?? t))];
    return `needs ${missing.join(', ')} (apt-get install ${pkgs.join(' ')})`;
  }
  // Root in a container without CAP_SYS_ADMIN cannot create namespaces: try one.
  const probe = `dshprobe${randomBytes(3).toString('hex')}`;
  try {
    execFileSync('ip', ['netns', 'add', probe], { stdio: 'pipe', timeout: 5_000 });
  } catch (err) {
    return `cannot create a network namespace: ${firstLine(err)}`;
  }
  try {
    execFileSync('ip', ['netns', 'del', probe], { stdio: 'pipe', timeout: 5_000 });
  } catch {
    // best effort
  }
  return undefined;
}

/** Print why and exit 77 (the test runner's "skipped") when netns tests cannot run. */
export function skipUnlessNetns(tools: string[] = DEFAULT_TOOLS): void {
  const why = canRunNetns(tools);
  if (why !== undefined) {
    console.log(`skipped: ${why}`);
    process.exit(SKIP_EXIT_CODE);
  }
}

function firstLine(err: unknown): string {
  const e = err as { stderr?: Buffer | string; message?: string };
  const text = (e.stderr ? e.stderr.toString() : '') || e.message || String(err);
  return text.trim().split('\n')[0] ?? '';
}

/** Run a command on the host (no shell). Rejects on non-zero exit unless allowFail. */
export function run(cmd: string, args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      { timeout: opts.timeout ?? 10_000, killSignal: 'SIGKILL', maxBuffer: 16 * 1024 * 1024, env: opts.env ?? process.env },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
        if (err && !opts.allowFail) {
          const killed = (err as { killed?: boolean }).killed ? ` (killed after ${opts.timeout ?? 10_000} ms)` : '';
          reject(new Error(`${cmd} ${args.join(' ')} failed${killed}: ${stderr.trim() || err.message}`));
          return;
        }
        resolve({ stdout, stderr, code });
      },
    );
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

/** Run a command inside namespace `ns` (`ip netns exec ns cmd ...args`). */
export function exec(ns: string, cmd: string, args: string[], opts: ExecOptions = {}): Promise<ExecResult> {
  return run('ip', ['netns', 'exec', ns, cmd, ...args], opts);
}

// ---------------------------------------------------------------------------
// Everything this process created, for cleanup on any exit.

const ownedNamespaces = new Set<string>();
const ownedChildren = new Set<ChildProcess>();
let exitHooksInstalled = false;

function installExitHooks(): void {
  if (exitHooksInstalled) return;
  exitHooksInstalled = true;
  // 'exit' handlers must be synchronous: cleanupAllSync uses execFileSync.
  process.on('exit', cleanupAllSync);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(sig, () => {
      cleanupAllSync();
      process.exit(128 + (sig === 'SIGINT' ? 2 : sig === 'SIGTERM' ? 15 : 1));
    });
  }
}

function killChild(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  try {
    // Children are spawned detached (their own process group): kill the group
    // so a command's own children go too. The group id is the PID we started.
    process.kill(-child.pid, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
}

/** Kill every process still inside `ns` (they were all started by this run), then delete it. */
function deleteNamespaceSync(ns: string): void {
  try {
    const pids = execFileSync('ip', ['netns', 'pids', ns], { stdio: 'pipe', timeout: 5_000 })
      .toString()
      .split(/\s+/)
      .filter(Boolean)
      .map(Number)
      .filter((pid) => Number.isInteger(pid) && pid > 1 && pid !== process.pid);
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  } catch {
    // namespace already gone
  }
  try {
    execFileSync('ip', ['netns', 'del', ns], { stdio: 'pipe', timeout: 5_000 });
  } catch {
    // already gone
  }
  rmSync(join(ETC_NETNS, ns), { recursive: true, force: true });
}

/** Synchronous cleanup of everything this process created. Idempotent. */
export function cleanupAllSync(): void {
  for (const child of ownedChildren) killChild(child, 'SIGKILL');
  ownedChildren.clear();
  for (const ns of ownedNamespaces) deleteNamespaceSync(ns);
  ownedNamespaces.clear();
  try {
    rmdirSync(ETC_NETNS); // only if empty: another run's entries stay
  } catch {
    // not empty, or not there
  }
}

/** A fresh unique name: "dsh" + 6 random hex digits + suffix. */
export function uniqueName(suffix = ''): string {
  return `dsh${randomBytes(3).toString('hex')}${suffix}`;
}

/** Create an empty namespace with loopback up; it is removed by cleanup. */
export async function createNamespace(name: string = uniqueName()): Promise<string> {
  installExitHooks();
  await run('ip', ['netns', 'add', name]);
  ownedNamespaces.add(name);
  await exec(name, 'ip', ['link', 'set', 'lo', 'up']);
  return name;
}

/** Kill what runs in `ns` and delete it (and its /etc/netns entry). */
export function deleteNamespace(ns: string): void {
  for (const child of [...ownedChildren]) {
    if ((child as ChildProcess & { dshNetns?: string }).dshNetns === ns) {
      killChild(child, 'SIGKILL');
      ownedChildren.delete(child);
    }
  }
  deleteNamespaceSync(ns);
  ownedNamespaces.delete(ns);
}

/**
 * Files that `ip netns exec ns` bind-mounts over /etc (e.g. 'resolv.conf'):
 * processes run in the namespace that way see these instead of the host's.
 */
export function writeNetnsEtc(ns: string, files: Record<string, string>): string {
  const dir = join(ETC_NETNS, ns);
  mkdirSync(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) writeFileSync(join(dir, name), content);
  return dir;
}

/**
 * Start a long-running command inside `ns` (own process group, killed by PID
 * on cleanup). stdio defaults to pipes; the caller reads or ignores them.
 */
export function spawnIn(ns: string, cmd: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
  installExitHooks();
  const child = spawn('ip', ['netns', 'exec', ns, cmd, ...args], { stdio: 'pipe', ...opts, detached: true });
  (child as ChildProcess & { dshNetns?: string }).dshNetns = ns;
  ownedChildren.add(child);
  child.once('exit', () => ownedChildren.delete(child));
  return child;
}

/** SIGTERM a child started by spawnIn, SIGKILL after `graceMs`; resolves when it has exited. */
export function stopChild(child: ChildProcess, graceMs = 2_000): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) {
      resolve();
      return;
    }
    const timer = setTimeout(() => killChild(child, 'SIGKILL'), graceMs);
    child.once('exit', () => {
      clearTimeout(timer);
      ownedChildren.delete(child);
      resolve();
    });
    killChild(child, 'SIGTERM');
  });
}

// ---------------------------------------------------------------------------
// The three-host topology.

export interface Topology {
  /** The run's id ("dsh1a2b3c"): every name below starts with it. */
  id: string;
  ns: { client: string; server: string; web: string };
  /** Interface names inside each namespace. */
  dev: {
    /** In client, toward server. */
    client: string;
    /** In server, toward client. */
    serverClientSide: string;
    /** In server, toward web. */
    serverWebSide: string;
    /** In web, toward server. */
    web: string;
  };
  addr: {
    client: string;
    serverClientSide: string;
    serverWebSide: string;
    web: string;
    client6: string;
    serverClientSide6: string;
    serverWebSide6: string;
    web6: string;
  };
  /** Remove the namespaces (and everything inside). Idempotent. */
  cleanup(): void;
}

export const TOPOLOGY_ADDR = {
  client: '10.200.1.2',
  serverClientSide: '10.200.1.1',
  serverWebSide: '10.200.2.1',
  web: '10.200.2.2',
  client6: 'fd00:200:1::2',
  serverClientSide6: 'fd00:200:1::1',
  serverWebSide6: 'fd00:200:2::1',
  web6: 'fd00:200:2::2',
} as const;

/** Build client — server — web. Removes what it built if any step fails. */
export async function createTopology(): Promise<Topology> {
  const id = uniqueName();
  const ns = { client: `${id}-client`, server: `${id}-server`, web: `${id}-web` };
  const dev = { client: 'veth-srv', serverClientSide: 'veth-cli', serverWebSide: 'veth-web', web: 'veth-srv' };
  const a = TOPOLOGY_ADDR;
  const cleanup = () => {
    for (const name of Object.values(ns)) deleteNamespace(name);
  };
  try {
    await Promise.all(Object.values(ns).map((name) => createNamespace(name)));
    // Each veth end is created directly inside its namespace, so the names
    // never exist (or collide) in the host namespace.
    await run('ip', ['link', 'add', dev.client, 'netns', ns.client, 'type', 'veth', 'peer', 'name', dev.serverClientSide, 'netns', ns.server]);
    await run('ip', ['link', 'add', dev.serverWebSide, 'netns', ns.server, 'type', 'veth', 'peer', 'name', dev.web, 'netns', ns.web]);
    // One `ip -batch` per namespace: ~20 commands cost one process each otherwise.
    const batch = (d: string, v4: string, v6: string): string[] => [
      `addr add ${v4}/24 dev ${d}`,
      `addr add ${v6}/64 dev ${d} nodad`,
      `link set ${d} up`,
    ];
    const client = [
      ...batch(dev.client, a.client, a.client6),
      `route add default via ${a.serverClientSide} dev ${dev.client}`,
      `route add ::/0 via ${a.serverClientSide6} dev ${dev.client}`,
    ];
    const server = [
      ...batch(dev.serverClientSide, a.serverClientSide, a.serverClientSide6),
      ...batch(dev.serverWebSide, a.serverWebSide, a.serverWebSide6),
    ];
    const web = [
      ...batch(dev.web, a.web, a.web6),
      `route add default via ${a.serverWebSide} dev ${dev.web}`,
      `route add ::/0 via ${a.serverWebSide6} dev ${dev.web}`,
    ];
    await Promise.all([
      run('ip', ['-n', ns.client, '-batch', '-'], { input: client.join('\n') + '\n' }),
      run('ip', ['-n', ns.server, '-batch', '-'], { input: server.join('\n') + '\n' }),
      run('ip', ['-n', ns.web, '-batch', '-'], { input: web.join('\n') + '\n' }),
      exec(ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=0', 'net.ipv6.conf.all.forwarding=0']),
    ]);
  } catch (err) {
    cleanup();
    throw err;
  }
  return { id, ns, dev, addr: { ...a }, cleanup };
}

/** The topology's names as an env var, for a child process that joins an existing topology. */
export function topologyToEnv(topo: Topology): Record<string, string> {
  return { DSHIELD_TEST_TOPOLOGY: JSON.stringify({ id: topo.id, ns: topo.ns, dev: topo.dev, addr: topo.addr }) };
}

/**
 * The topology a parent process created (see topologyToEnv), or undefined.
 * Its cleanup() does nothing: the parent owns the namespaces.
 */
export function topologyFromEnv(): Topology | undefined {
  const raw = process.env.DSHIELD_TEST_TOPOLOGY;
  if (!raw) return undefined;
  const t = JSON.parse(raw) as Omit<Topology, 'cleanup'>;
  return { ...t, cleanup: () => {} };
}
