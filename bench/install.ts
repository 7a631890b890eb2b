/**
 * The peers come from Debian: find the tools each system needs (and the
 * libsodium dshield uses when there is one), and install the missing
 * packages with apt-get (root only, bounded in time), unless
 * DSHIELD_BENCH_NO_INSTALL=1. A package Debian does not have is reported and
 * the systems needing it are skipped.
 */
import { execFile } from 'node:child_process';
import { hasTool } from '../test/helpers/netns.ts';

/** Tool -> Debian 12 package. */
export const PACKAGE_OF: Record<string, string> = {
  'wireguard-go': 'wireguard-go',
  wg: 'wireguard-tools',
  openvpn: 'openvpn',
  'ss-server': 'shadowsocks-libev',
  'ss-local': 'shadowsocks-libev',
  microsocks: 'microsocks',
  iperf3: 'iperf3',
  curl: 'curl',
  openssl: 'openssl',
  nft: 'nftables',
  ping: 'iputils-ping',
  ip: 'iproute2',
  taskset: 'util-linux',
  socat: 'socat',
};

function sh(cmd: string, args: string[], timeoutMs: number): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 32 * 1024 * 1024, env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0, out: `${stdout}${stderr}` }),
    );
  });
}

/**
 * Installs what is missing of `tools`; returns a line per problem (a package
 * Debian lacks, an install that failed) — the systems needing those tools
 * are then skipped by the caller, which checks hasTool again.
 */
export async function ensureTools(tools: string[], noInstall: boolean): Promise<string[]> {
  const missing = [...new Set(tools.filter((t) => !hasTool(t)))];
  if (missing.length === 0) return [];
  return installPackages([...new Set(missing.map((t) => PACKAGE_OF[t] ?? t))], `missing ${missing.join(', ')}`, noInstall);
}

/**
 * dshield seals small records through the system's libsodium when one is
 * installed (core/libsodium-aead.ts), as a user's machine with
 * shadowsocks-libev or many other packages has it: installs Debian's
 * libsodium23 when no libsodium is known to the dynamic linker.
 */
export async function ensureLibsodium(noInstall: boolean): Promise<string[]> {
  const known = await sh('ldconfig', ['-p'], 30_000);
  if (known.code === 0 && /\blibsodium\.so\b/.test(known.out)) return [];
  return installPackages(['libsodium23'], 'no system libsodium (dshield seals small records through sodium-native or OpenSSL instead)', noInstall);
}

async function installPackages(packages: string[], what: string, noInstall: boolean): Promise<string[]> {
  if (noInstall) return [`${what} (packages ${packages.join(' ')}); DSHIELD_BENCH_NO_INSTALL=1, so not installed`];
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return [`${what}: run as root to install ${packages.join(' ')}`];
  if (!hasTool('apt-get')) return [`${what} and no apt-get here to install ${packages.join(' ')}`];
  const problems: string[] = [];
  console.log(`installing from Debian: ${packages.join(' ')} (apt-get update, then install)`);
  await sh('apt-get', ['update', '-q'], 300_000);
  const available: string[] = [];
  for (const pkg of packages) {
    const policy = await sh('apt-cache', ['policy', pkg], 30_000);
    const candidate = /Candidate:\s*(\S+)/.exec(policy.out)?.[1];
    if (!candidate || candidate === '(none)') problems.push(`package ${pkg} does not exist in this Debian release`);
    else available.push(pkg);
  }
  if (available.length) {
    const r = await sh('apt-get', ['install', '-y', '-q', '--no-install-recommends', ...available], 900_000);
    if (r.code !== 0) problems.push(`apt-get install ${available.join(' ')} failed: ${r.out.trim().split('\n').slice(-2).join(' ')}`);
  }
  return problems;
}
