/**
 * The systems dshield is measured against, each started inside the bench's
 * namespaces and stopped (by PID) before the next one starts:
 *
 *   TUN mode    plain forwarding (the baseline), wireguard-go (userspace),
 *               OpenVPN 2.6 (--disable-dco, peer-to-peer TLS, throwaway PKI)
 *   proxy mode  curl straight to the web host (the baseline), microsocks
 *               (plain SOCKS5, no crypto), shadowsocks-libev ss-local/ss-server
 *               (these run side by side, each on its own ports: see `slot`)
 *
 * A tunnel's server masquerades the tunnel subnet toward the web host, so the
 * web host's log shows the server's address for traffic that went through the
 * tunnel, and the client's for traffic that went around it.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startIn, type BenchProc } from './proc.ts';
import { PORTS } from './settings.ts';
import { nsRun, type BenchTopology } from './topology.ts';

/** A system that is up and can be measured. */
export interface Running {
  /** PIDs whose CPU time is the system's cost (empty: all work is in the kernel). */
  pids: number[];
  /** Proxy mode: curl's proxy arguments (run in the client namespace). */
  curlProxy?: string[];
  /** Proxy mode: the SOCKS5 address inside the client namespace ("host:port"). */
  socks?: string;
  /** Facts worth recording (the negotiated cipher, a version). */
  notes: string[];
  stop(): Promise<void>;
}

export interface SystemSpec {
  /** Stable id: 'plain', 'wireguard-go', 'openvpn/aes-256-gcm', 'dshield-tun/udp/chacha20-poly1305', ... */
  id: string;
  system: string;
  mode: 'tun' | 'proxy';
  cipher: string;
  role: 'baseline' | 'peer' | 'reference' | 'dshield';
  /** Which source address the web host must see: the client's (no NAT) or the server's. */
  expectSource: 'client' | 'server';
  /** Debian packages (or tools) it needs; missing ones make it 'skipped'. */
  needs: string[];
  /**
   * `slot` (proxy mode, default 0): the proxy section runs its systems side
   * by side, and slot n moves each port a system listens on up by n (a
   * client-side SOCKS5 proxy's, 1080 + n, and its server's), so none collide.
   */
  start(bt: BenchTopology, work: string, slot?: number): Promise<Running>;
}

/** The SOCKS5 port inside the client namespace of the proxy system in `slot`. */
export function socksPort(slot = 0): number {
  return PORTS.socks + slot;
}

async function stopAllOf(procs: BenchProc[]): Promise<void> {
  await Promise.allSettled(procs.map((p) => p.stop()));
}

/** Wait (bounded) for a network device to appear in a namespace. */
async function waitForLink(ns: string, dev: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      await nsRun(ns, 'ip', ['link', 'show', dev]);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`device ${dev} did not appear in ${ns} within ${ms} ms`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

// ---------------------------------------------------------------------------
// TUN mode

export const plainForwarding: SystemSpec = {
  id: 'plain',
  system: 'plain forwarding (no VPN)',
  mode: 'tun',
  cipher: '—',
  role: 'baseline',
  expectSource: 'client',
  needs: [],
  async start(bt) {
    await bt.forwarding(true);
    return { pids: [], notes: ['kernel IPv4 forwarding in the server namespace'], stop: () => bt.forwarding(false) };
  },
};

const WG_SUBNET = '10.10.0.0/24';
export const wireguardGo: SystemSpec = {
  id: 'wireguard-go',
  system: 'wireguard-go',
  mode: 'tun',
  cipher: 'chacha20-poly1305',
  role: 'peer',
  expectSource: 'server',
  needs: ['wireguard-go', 'wg'],
  async start(bt, work) {
    const { ns, addr } = bt.topo;
    const key = () => {
      const priv = execFileSync('wg', ['genkey']).toString().trim();
      const pub = execFileSync('wg', ['pubkey'], { input: priv }).toString().trim();
      return { priv, pub };
    };
    const [sk, ck] = [key(), key()];
    const write = (name: string, text: string) => {
      const p = join(work, name);
      writeFileSync(p, text + '\n', { mode: 0o600 });
      return p;
    };
    const procs: BenchProc[] = [];
    const env = { WG_PROCESS_FOREGROUND: '1', LOG_LEVEL: 'error' };
    // wireguard-go's control socket is /var/run/wireguard/NAME.sock, shared by all namespaces: unique names.
    const sdev = `${bt.topo.id.slice(3)}wgs`;
    const cdev = `${bt.topo.id.slice(3)}wgc`;
    try {
      procs.push(startIn(ns.server, 'wireguard-go(server)', 'wireguard-go', ['-f', sdev], { env }));
      procs.push(startIn(ns.client, 'wireguard-go(client)', 'wireguard-go', ['-f', cdev], { env }));
      await waitForLink(ns.server, sdev);
      await waitForLink(ns.client, cdev);
      await nsRun(ns.server, 'wg', ['set', sdev, 'private-key', write('wg-server.key', sk.priv), 'listen-port', String(PORTS.wireguard), 'peer', ck.pub, 'allowed-ips', '10.10.0.2/32']);
      await nsRun(ns.client, 'wg', ['set', cdev, 'private-key', write('wg-client.key', ck.priv), 'peer', sk.pub, 'endpoint', `${addr.serverClientSide}:${PORTS.wireguard}`, 'allowed-ips', '0.0.0.0/0', 'persistent-keepalive', '25']);
      await nsRun(ns.server, 'ip', ['-batch', '-'], `addr add 10.10.0.1/24 dev ${sdev}\nlink set ${sdev} mtu 1420 up\n`);
      await nsRun(ns.client, 'ip', ['-batch', '-'], `addr add 10.10.0.2/24 dev ${cdev}\nlink set ${cdev} mtu 1420 up\nroute add ${bt.webIp}/32 dev ${cdev}\n`);
      await bt.forwarding(true);
      await bt.masquerade(WG_SUBNET);
    } catch (err) {
      await stopAllOf(procs);
      throw err;
    }
    return {
      pids: procs.map((p) => p.pid),
      notes: [`wireguard-go ${version('wireguard-go')}, userspace, MTU 1420`],
      async stop() {
        await stopAllOf(procs);
        await bt.unmasquerade();
        await bt.forwarding(false);
      },
    };
  },
};

/** A throwaway PKI: a CA, and a server and a client certificate it signs (EC P-256, one day). */
function makePki(work: string): Record<'ca' | 'serverCert' | 'serverKey' | 'clientCert' | 'clientKey', string> {
  const p = (n: string) => join(work, n);
  const ossl = (args: string[]) => execFileSync('openssl', args, { stdio: 'pipe', timeout: 20_000 });
  const ext = p('ext.cnf');
  writeFileSync(ext, '[server]\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyAgreement\n[client]\nextendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyAgreement\n');
  ossl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', p('ca.key'), '-out', p('ca.crt'), '-days', '1', '-subj', '/CN=dshield-bench-ca']);
  for (const who of ['server', 'client']) {
    ossl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', p(`${who}.key`), '-out', p(`${who}.csr`), '-subj', `/CN=bench-${who}`]);
    ossl(['x509', '-req', '-in', p(`${who}.csr`), '-CA', p('ca.crt'), '-CAkey', p('ca.key'), '-CAcreateserial', '-out', p(`${who}.crt`), '-days', '1', '-extfile', ext, '-extensions', who]);
    chmodSync(p(`${who}.key`), 0o600);
  }
  return { ca: p('ca.crt'), serverCert: p('server.crt'), serverKey: p('server.key'), clientCert: p('client.crt'), clientKey: p('client.key') };
}

const OVPN_SUBNET = '10.11.0.0/24';
function openvpn(cipher: 'AES-256-GCM' | 'CHACHA20-POLY1305'): SystemSpec {
  return {
    id: `openvpn/${cipher.toLowerCase()}`,
    system: 'OpenVPN 2.6',
    mode: 'tun',
    cipher: cipher.toLowerCase(),
    role: 'peer',
    expectSource: 'server',
    needs: ['openvpn', 'openssl'],
    async start(bt, work) {
      const { ns, addr } = bt.topo;
      const pki = makePki(work);
      const common = ['--dev', 'ovpn0', '--dev-type', 'tun', '--proto', 'udp', '--disable-dco', '--data-ciphers', cipher, '--cipher', cipher, '--ca', pki.ca, '--verb', '3', '--ping', '10', '--tun-mtu', '1500', '--mssfix', '0'];
      const procs: BenchProc[] = [];
      try {
        const server = startIn(ns.server, 'openvpn(server)', 'openvpn', [
          ...common,
          '--local', addr.serverClientSide, '--lport', String(PORTS.openvpn),
          '--ifconfig', '10.11.0.1', '10.11.0.2', '--tls-server', '--dh', 'none', '--cert', pki.serverCert, '--key', pki.serverKey,
        ]);
        procs.push(server);
        const client = startIn(ns.client, 'openvpn(client)', 'openvpn', [
          ...common,
          '--remote', addr.serverClientSide, String(PORTS.openvpn), '--nobind',
          '--ifconfig', '10.11.0.2', '10.11.0.1', '--tls-client', '--remote-cert-tls', 'server', '--cert', pki.clientCert, '--key', pki.clientKey,
          '--route', bt.webIp, '255.255.255.255',
        ]);
        procs.push(client);
        await Promise.all([server.waitFor(/Initialization Sequence Completed/, 30_000), client.waitFor(/Initialization Sequence Completed/, 30_000)]);
        await bt.forwarding(true);
        await bt.masquerade(OVPN_SUBNET);
      } catch (err) {
        await stopAllOf(procs);
        throw err;
      }
      const negotiated = /Data Channel: cipher '([^']+)'/.exec(procs[1]!.output())?.[1] ?? /Outgoing Data Channel: Cipher '([^']+)'/.exec(procs[1]!.output())?.[1];
      if (negotiated && negotiated.toUpperCase() !== cipher) {
        await stopAllOf(procs);
        throw new Error(`OpenVPN negotiated ${negotiated}, not ${cipher}`);
      }
      return {
        pids: procs.map((p) => p.pid),
        notes: [`${version('openvpn')}; data channel ${negotiated ?? cipher} (from its log)`],
        async stop() {
          await stopAllOf(procs);
          await bt.unmasquerade();
          await bt.forwarding(false);
        },
      };
    },
  };
}
export const openvpnAes = openvpn('AES-256-GCM');
export const openvpnChacha = openvpn('CHACHA20-POLY1305');

// ---------------------------------------------------------------------------
// Proxy mode

export const plainDirect: SystemSpec = {
  id: 'plain',
  system: 'plain forwarding (no proxy)',
  mode: 'proxy',
  cipher: '—',
  role: 'baseline',
  expectSource: 'client',
  needs: [],
  async start(bt) {
    await bt.forwarding(true);
    return { pids: [], curlProxy: [], notes: ['curl straight to the web host through kernel forwarding'], stop: () => bt.forwarding(false) };
  },
};

export const microsocks: SystemSpec = {
  id: 'microsocks',
  system: 'microsocks (SOCKS5, no crypto)',
  mode: 'proxy',
  cipher: 'none',
  role: 'reference',
  expectSource: 'server',
  needs: ['microsocks'],
  async start(bt, _work, slot = 0) {
    const { ns, addr } = bt.topo;
    const port = PORTS.microsocks + slot;
    const proc = startIn(ns.server, 'microsocks', 'microsocks', ['-i', addr.serverClientSide, '-p', String(port)]);
    await waitForPort(bt, ns.client, addr.serverClientSide, port, proc);
    const socks = `${addr.serverClientSide}:${port}`;
    return { pids: [proc.pid], socks, curlProxy: ['--socks5-hostname', socks], notes: ['client connects straight to the proxy on the server host'], stop: () => proc.stop() };
  },
};

function shadowsocks(method: 'chacha20-ietf-poly1305' | 'aes-256-gcm'): SystemSpec {
  return {
    id: `shadowsocks/${method}`,
    system: 'shadowsocks-libev',
    mode: 'proxy',
    cipher: method,
    role: 'peer',
    expectSource: 'server',
    needs: ['ss-server', 'ss-local'],
    async start(bt, work, slot = 0) {
      const { ns, addr } = bt.topo;
      const config = join(work, `ss-${method}.json`);
      const serverPort = PORTS.shadowsocks + slot;
      const local = socksPort(slot);
      writeFileSync(
        config,
        JSON.stringify({ server: addr.serverClientSide, server_port: serverPort, password: randomBytes(24).toString('base64'), method, timeout: 300 }),
        { mode: 0o600 },
      );
      const procs: BenchProc[] = [];
      try {
        const server = startIn(ns.server, 'ss-server', 'ss-server', ['-c', config]);
        procs.push(server);
        await waitForPort(bt, ns.client, addr.serverClientSide, serverPort, server);
        const client = startIn(ns.client, 'ss-local', 'ss-local', ['-c', config, '-b', '127.0.0.1', '-l', String(local)]);
        procs.push(client);
        await waitForPort(bt, ns.client, '127.0.0.1', local, client);
      } catch (err) {
        await stopAllOf(procs);
        throw err;
      }
      return {
        pids: procs.map((p) => p.pid),
        socks: `127.0.0.1:${local}`,
        curlProxy: ['--socks5-hostname', `127.0.0.1:${local}`],
        notes: [`shadowsocks-libev ${version('ss-server')}`],
        stop: () => stopAllOf(procs),
      };
    },
  };
}
export const shadowsocksChacha = shadowsocks('chacha20-ietf-poly1305');
export const shadowsocksAes = shadowsocks('aes-256-gcm');

/** Wait (bounded) until a TCP port accepts connections, seen from namespace `from`. */
export async function waitForPort(bt: BenchTopology, from: string, host: string, port: number, proc?: BenchProc, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (proc && !proc.running()) throw new Error(`${proc.name} exited: ${proc.output().trim().split('\n').slice(-5).join(' | ')}`);
    const ok = await nsRun(from, 'bash', ['-c', `exec 3<>/dev/tcp/${host}/${port}`]).then(
      () => true,
      () => false,
    );
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${host}:${port} (seen from ${from}) after ${ms} ms`);
    await new Promise((r) => setTimeout(r, 150));
  }
  void bt;
}

const versions = new Map<string, string>();
/** The Debian package version of the package that ships `tool` (for the results' notes). */
export function version(tool: string): string {
  if (!versions.has(tool)) {
    let v = '?';
    try {
      const path = execFileSync('bash', ['-c', `command -v ${tool}`]).toString().trim();
      const pkg = execFileSync('dpkg', ['-S', path], { stdio: 'pipe' }).toString().split(':')[0]!;
      v = `${pkg} ${execFileSync('dpkg-query', ['-W', '-f', '${Version}', pkg]).toString()}`;
    } catch {
      // not from a Debian package
    }
    versions.set(tool, v);
  }
  return versions.get(tool)!;
}
