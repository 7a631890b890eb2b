/**
 * TUN device (core/tun/device.ts) and network configuration
 * (core/tun/netconfig.ts, state.ts) on a real kernel, inside network
 * namespaces this test builds (test/helpers/netns.ts). Needs root and
 * /dev/net/tun; skips (exit 77) elsewhere.
 *
 * The file runs twice: started normally it builds the client — server — web
 * topology and re-runs itself inside the client namespace with
 * `ip netns exec`, which also bind-mounts /etc/netns/<client>/resolv.conf
 * over /etc/resolv.conf in a private mount namespace; so DNS changes land in
 * that file, and the parent checks afterwards that the host's
 * /etc/resolv.conf is byte for byte what it was.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createSocket } from 'node:dgram';
import { connect, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DshieldError, ErrorCodes, isDshieldError } from '../core/errors.ts';
import { openTun, openTunQueues, type OpenTunOptions, type TunDevice } from '../core/tun/device.ts';
import { EINVAL } from '../core/errno.ts';
import { IFF_VNET_HDR, IFNAMSIZ, TUNSETIFF, libc } from '../core/tun/libc.ts';
import { NetChanges } from '../core/tun/netconfig.ts';
import { TunQueueIo } from '../core/tun/queue-io.ts';
import { VNET_HDR_LEN } from '../core/tun/tcp-coalesce.ts';
import { killSwitchScript, serverNatScript } from '../core/tun/nft.ts';
import { StateJournal, currentNetns, recoverLeftovers } from '../core/tun/state.ts';
import {
  createTopology,
  exec,
  run,
  skipUnlessNetns,
  spawnIn,
  topologyFromEnv,
  topologyToEnv,
  writeNetnsEtc,
  type Topology,
} from './helpers/netns.ts';
import { withTimeout } from './helpers/timeout.ts';

const THIS_FILE = fileURLToPath(import.meta.url);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const NETNS_RESOLV = 'nameserver 10.200.1.1\n# the client namespace resolver (test)\n';

skipUnlessNetns(['ip', 'nft', 'ping']);

const joined = topologyFromEnv();
if (!joined) await runAsParent();

// ---------------------------------------------------------------------------
// Parent: build the topology, run this file inside the client namespace, check the host.

async function runAsParent(): Promise<never> {
  const hostResolv = snapshotHostResolv();
  let code = 1;
  const topo = await createTopology();
  try {
    writeNetnsEtc(topo.ns.client, { 'resolv.conf': NETNS_RESOLV });
    const child = spawnIn(topo.ns.client, process.execPath, ['--import', 'tsx', THIS_FILE], {
      stdio: 'inherit',
      cwd: ROOT,
      env: { ...process.env, ...topologyToEnv(topo) },
    });
    code = await withTimeout(new Promise<number>((r) => child.once('exit', (c, sig) => r(c ?? (sig ? 1 : 1)))), 90_000, 'the in-namespace run');
  } catch (err) {
    console.error(err);
  } finally {
    topo.cleanup();
  }
  const after = snapshotHostResolv();
  if (after !== hostResolv) {
    console.error(`FAIL: the host's /etc/resolv.conf changed during the test:\nbefore ${hostResolv}\nafter  ${after}`);
    code = 1;
  } else {
    console.log('host /etc/resolv.conf unchanged');
  }
  process.exit(code);
}

function snapshotHostResolv(): string {
  try {
    const st = lstatSync('/etc/resolv.conf');
    if (st.isSymbolicLink()) return `symlink -> ${readlinkSync('/etc/resolv.conf')}`;
    return `file mode ${(st.mode & 0o7777).toString(8)} sha256 ${createHash('sha256').update(readFileSync('/etc/resolv.conf')).digest('hex')}`;
  } catch {
    return 'absent';
  }
}

// ---------------------------------------------------------------------------
// Child: the tests, inside the client namespace.

const topo = joined as Topology;
const WEB = topo.addr.web;
const cleanups: Array<() => unknown> = [];
/**
 * The resolv.conf the DNS tests change: /etc/resolv.conf when it is the
 * netns bind mount here. Where the host's file is a symlink (systemd-resolved),
 * `ip netns exec` mounts over the link's target instead and replacing the
 * link itself would change the host: then a scratch copy is used.
 */
const RESOLV_PATH = resolvIsPrivateMount() ? '/etc/resolv.conf' : scratchResolv();

function scratchResolv(): string {
  const dir = mkdtempSync(join(tmpdir(), 'dshield-etc-'));
  const path = join(dir, 'resolv.conf');
  writeFileSync(path, NETNS_RESOLV);
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  console.log(`  (/etc/resolv.conf is not a private mount here: DNS tests use ${path})`);
  return path;
}
test.after(async () => {
  for (const fn of cleanups.reverse()) {
    try {
      await fn();
    } catch {
      // keep cleaning
    }
  }
});

/** Internet checksum over a list of byte ranges. */
function checksum(parts: Uint8Array[]): number {
  let sum = 0;
  for (const p of parts) {
    for (let i = 0; i + 1 < p.length; i += 2) sum += (p[i]! << 8) | p[i + 1]!;
    if (p.length & 1) sum += p[p.length - 1]! << 8;
  }
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

function isEchoRequest(p: Uint8Array): boolean {
  const v = p[0]! >> 4;
  if (v === 4) return p[9] === 1 && p[((p[0]! & 15) * 4)] === 8;
  if (v === 6) return p[6] === 58 && p[40] === 128;
  return false;
}

/** An echo reply for an echo request (IPv4 ICMP or ICMPv6): swap addresses, fix type and checksums. */
function echoReply(req: Uint8Array): Buffer {
  const r = Buffer.from(req);
  if (r[0]! >> 4 === 4) {
    const ihl = (r[0]! & 15) * 4;
    r.set(req.subarray(16, 20), 12);
    r.set(req.subarray(12, 16), 16);
    r[ihl] = 0; // echo reply
    r.writeUInt16BE(0, ihl + 2);
    r.writeUInt16BE(checksum([r.subarray(ihl)]), ihl + 2);
    r.writeUInt16BE(0, 10);
    r.writeUInt16BE(checksum([r.subarray(0, ihl)]), 10);
    return r;
  }
  r.set(req.subarray(24, 40), 8);
  r.set(req.subarray(8, 24), 24);
  r[40] = 129;
  r.writeUInt16BE(0, 42);
  const body = r.subarray(40);
  const pseudo = Buffer.alloc(40);
  r.copy(pseudo, 0, 8, 40);
  pseudo.writeUInt32BE(body.length, 32);
  pseudo[39] = 58;
  r.writeUInt16BE(checksum([pseudo, body]), 42);
  return r;
}

/** A valid IPv4 UDP packet from 10.9.0.2 to `dst`:9 with `size` bytes of payload. */
function udpPacket(dst: number[], size: number): Buffer {
  const p = Buffer.alloc(28 + size);
  p[0] = 0x45;
  p.writeUInt16BE(p.length, 2);
  p[8] = 64;
  p[9] = 17;
  p.set([10, 9, 0, 2], 12);
  p.set(dst, 16);
  p.writeUInt16BE(checksum([p.subarray(0, 20)]), 10);
  p.writeUInt16BE(4000, 20);
  p.writeUInt16BE(9, 22);
  p.writeUInt16BE(8 + size, 24);
  return p; // UDP checksum 0: none (allowed for IPv4)
}

/** Answers echo requests that the kernel routes into `dev`; counts them. */
function echoResponder(dev: TunDevice): { requests: Uint8Array[] } {
  const seen = { requests: [] as Uint8Array[] };
  dev.onPacket((p) => {
    if (!isEchoRequest(p)) return;
    seen.requests.push(Buffer.from(p));
    dev.write(echoReply(p));
  });
  return seen;
}

async function ping(args: string[], timeout = 10_000): Promise<{ ok: boolean; out: string }> {
  const r = await run('ping', ['-n', ...args], { allowFail: true, timeout });
  return { ok: r.code === 0, out: r.stdout + r.stderr };
}

async function linkExists(name: string): Promise<boolean> {
  return (await run('ip', ['link', 'show', 'dev', name], { allowFail: true })).code === 0;
}

async function snapshot(): Promise<Record<string, string>> {
  const text = async (cmd: string, args: string[]) => (await run(cmd, args)).stdout;
  return {
    route4: await text('ip', ['-4', 'route', 'show', 'table', 'all']),
    route6: await text('ip', ['-6', 'route', 'show', 'table', 'all']),
    nft: await text('nft', ['list', 'ruleset']),
    resolv: readFileSync(RESOLV_PATH, 'utf8'),
    resolvKind: lstatSync(RESOLV_PATH).isSymbolicLink() ? 'symlink' : 'file',
    forward: readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8'),
    forward6: readFileSync('/proc/sys/net/ipv6/conf/all/forwarding', 'utf8'),
  };
}

/** TCP connect from this namespace; resolves 'ok' (got the greeting), or the error code. */
function tcpProbe(host: string, port: number, ms = 3_000): Promise<string> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const timer = setTimeout(() => {
      s.destroy();
      resolve('timeout');
    }, ms);
    s.once('data', () => {
      clearTimeout(timer);
      s.destroy();
      resolve('ok');
    });
    s.once('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(err.code ?? 'error');
    });
  });
}

/** Is /etc/resolv.conf a mount point here (ip netns exec's bind mount)? Then writing it cannot reach the host file. */
function resolvIsPrivateMount(): boolean {
  const info = readFileSync('/proc/self/mountinfo', 'utf8');
  return info.split('\n').some((l) => l.split(' ')[4] === '/etc/resolv.conf');
}

// ---------------------------------------------------------------------------

test('bad options and a taken name are DshieldErrors with one clear line', async () => {
  for (const opts of [{ name: 'this-name-is-too-long' }, { name: 'a b' }, { name: 'x%d%d' }, { queues: 0 }, { queues: 1.5 }, { mtu: 20 }]) {
    try {
      await openTun(opts);
      assert.unreachable(`accepted ${JSON.stringify(opts)}`);
    } catch (err) {
      assert.ok(isDshieldError(err, ErrorCodes.TUN), `${JSON.stringify(opts)}: ${String(err)}`);
      assert.not.ok((err as Error).message.includes('\n'));
    }
  }
  const first = openTunQueues({ name: 'dshtaken' });
  try {
    assert.is(first.name, 'dshtaken');
    assert.throws(
      () => openTunQueues({ name: 'dshtaken' }),
      (err: unknown) => isDshieldError(err, ErrorCodes.TUN) && /already exists/.test((err as Error).message),
    );
  } finally {
    first.close();
  }
  assert.not.ok(await linkExists('dshtaken'), 'device removed once its only fd closed');
});

test('without root: a DshieldError saying TUN mode needs root', async () => {
  if ((await run('setpriv', ['--version'], { allowFail: true }).catch(() => ({ code: 1 }))).code !== 0) {
    console.log('  (no setpriv here: the unprivileged case is not checked)');
    return;
  }
  const code =
    `import { openTunQueues } from ${JSON.stringify(join(ROOT, 'core/tun/device.ts'))};` +
    `try { openTunQueues(); console.log('OPENED'); } catch (e) { console.log(JSON.stringify({ code: e.code, name: e.name, message: e.message })); }`;
  const r = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '--import', 'tsx', '--input-type=module', '-e', code], {
    allowFail: true,
    timeout: 20_000,
    env: { ...process.env, HOME: '/tmp' },
  });
  const line = r.stdout.trim().split('\n').pop() ?? '';
  assert.not.ok(line.includes('OPENED'), 'an unprivileged user must not get a TUN device');
  const e = JSON.parse(line) as { code: string; name: string; message: string };
  assert.is(e.code, ErrorCodes.TUN);
  assert.is(e.name, 'DshieldError');
  assert.match(e.message, /needs root \(or CAP_NET_ADMIN\) and \/dev\/net\/tun/);
});

test('ping through the device: requests arrive via onPacket, crafted replies make ping succeed (IPv4 and IPv6)', async () => {
  const dev = await withTimeout(openTun({ name: 'dshtun%d', mtu: 1400 }), 20_000, 'openTun');
  cleanups.push(() => dev.close());
  assert.match(dev.name, /^dshtun\d+$/);
  assert.is(dev.mtu, 1400);
  assert.is(readFileSync(`/sys/class/net/${dev.name}/mtu`, 'utf8').trim(), '1400');
  const net = await NetChanges.start({ stateDir: false });
  await net.addAddress(dev.name, '10.9.0.1/24');
  await net.addAddress(dev.name, 'fd09::1/64');
  await net.linkUp(dev.name);
  const seen = echoResponder(dev);

  const v4 = await ping(['-c', '3', '-i', '0.2', '-W', '2', '10.9.0.2']);
  assert.ok(v4.ok, v4.out);
  assert.match(v4.out, /3 received/);
  const req = seen.requests.find((p) => p[0]! >> 4 === 4)!;
  assert.ok(req, 'an IPv4 echo request came through onPacket');
  assert.equal([...req.subarray(12, 20)], [10, 9, 0, 1, 10, 9, 0, 2], 'from our address to the routed one');

  const v6 = await ping(['-6', '-c', '2', '-i', '0.2', '-W', '2', 'fd09::2']);
  assert.ok(v6.ok, v6.out);
  assert.ok(seen.requests.some((p) => p[0]! >> 4 === 6), 'an IPv6 echo request came through onPacket');
  const s = dev.stats();
  assert.ok(s.rxPackets >= 5 && s.txPackets >= 5, JSON.stringify(s));

  await net.undoAll();
  await dev.close();
  assert.not.ok(await linkExists(dev.name), 'device gone after close()');
  assert.is(dev.write(Buffer.alloc(20)), false, 'write after close is refused');
});

test('multi-queue: N queues are N fds on one device, and traffic flows', async () => {
  const dev = await withTimeout(openTun({ name: 'dshmq%d', queues: 3 }), 30_000, 'openTun 3 queues');
  cleanups.push(() => dev.close());
  assert.is(dev.queues, 3);
  const details = (await run('ip', ['-d', 'link', 'show', 'dev', dev.name])).stdout;
  assert.match(details, /multi_queue numqueues 3/);
  await run('ip', ['addr', 'add', '10.10.0.1/24', 'dev', dev.name]);
  await run('ip', ['link', 'set', dev.name, 'up']);
  const seen = echoResponder(dev);
  const results = await Promise.all(['10.10.0.2', '10.10.0.3', '10.10.0.4', '10.10.0.5'].map((ip) => ping(['-c', '2', '-i', '0.2', '-W', '2', ip])));
  for (const r of results) assert.ok(r.ok, r.out);
  assert.ok(seen.requests.length >= 8);
  await dev.close();
  assert.not.ok(await linkExists(dev.name));
});

/** Where the kernel refuses IFF_VNET_HDR the device has none: the same paths must hold with plain packets. */
const HEADER_CASES = [
  { vnetHeader: true, tag: '' },
  { vnetHeader: false, tag: ' (a device without a vnet header)' },
] as const;

for (const { vnetHeader, tag } of HEADER_CASES) {
  test(`TunQueueIo asks the device for its header; read lands a packet at \`at\`, writeAt writes one in place${tag}`, async () => {
    const tun = openTunQueues({ name: vnetHeader ? 'dshio%d' : 'dshion%d', queues: 2, vnetHeader });
    cleanups.push(() => tun.close());
    assert.is(tun.vnetHeader, vnetHeader);
    const ios = tun.fds.map((fd) => new TunQueueIo(fd, -1));
    for (const io of ios) assert.is(io.headerLength, vnetHeader ? VNET_HDR_LEN : 0, 'every queue has the same header');
    await run('ip', ['addr', 'add', '10.18.0.1/24', 'dev', tun.name]);
    await run('ip', ['link', 'set', tun.name, 'up']);

    // Out of the device: the packet starts at `at` whatever the header.
    const send = seqSender('10.18.0.2');
    const buf = Buffer.alloc(2048, 0xee);
    const at = 64;
    let got: Buffer | undefined;
    send(7);
    await waitFor('the datagram out of the device', () => {
      for (const io of ios) {
        const n = io.read(buf, at);
        if (n > 0 && buf[at]! >> 4 === 4 && buf[at + 9] === 17) got = Buffer.from(buf.subarray(at, at + n));
      }
      return got !== undefined;
    });
    assert.is(got!.readUInt16BE(2), got!.length, 'one whole IPv4 packet');
    assert.is(got!.readUInt32BE(28), 7, 'its payload in place');
    assert.ok(buf.subarray(at + got!.length, at + got!.length + 16).every((b) => b === 0xee), 'nothing after it');

    // Into the device, in place: a UDP datagram from 10.18.0.2 to a socket here.
    const sock = createSocket('udp4');
    cleanups.push(() => sock.close());
    const seen: number[] = [];
    sock.on('message', (m) => seen.push(m.readUInt32BE(0)));
    await new Promise<void>((r) => sock.bind(0, '10.18.0.1', () => r()));
    const p = udpPacket([10, 18, 0, 1], 64);
    p.set([10, 18, 0, 2], 12);
    p.writeUInt16BE(0, 10);
    p.writeUInt16BE(checksum([p.subarray(0, 20)]), 10);
    p.writeUInt16BE(sock.address().port, 22);
    p.writeUInt32BE(42, 28);
    const out = Buffer.alloc(at + p.length, 0xee);
    p.copy(out, at);
    assert.ok(ios[1]!.writeAt(out, at, p.length), 'the kernel took the packet');
    assert.not.ok(ios[1]!.writeAt(out, at, p.length + 1), 'a length past the buffer: refused, nothing handed to the kernel');
    assert.ok(ios[0]!.write(p), 'and the same packet by write()');
    await waitFor('both datagrams at the socket', () => seen.length === 2);
    assert.equal(seen, [42, 42]);
    tun.close();
  });
}

test('a kernel that refuses IFF_VNET_HDR gets a device without it, and packets flow both ways', async () => {
  // The refusal is played by this thread's libc calls (the pumps' threads ask the real kernel, which then has no header to report).
  const c = libc();
  const { ioctlPtr, errno } = c;
  let refused = 0;
  let fake = 0;
  c.ioctlPtr = (fd, request, arg) => {
    const flags = arg[IFNAMSIZ]! | (arg[IFNAMSIZ + 1]! << 8);
    fake = request === TUNSETIFF && (flags & IFF_VNET_HDR) !== 0 ? EINVAL : 0;
    if (fake !== 0) {
      refused++;
      return -1;
    }
    return ioctlPtr(fd, request, arg);
  };
  c.errno = () => (fake !== 0 ? fake : errno());
  let dev: TunDevice;
  try {
    dev = await upTun({ name: 'dshref%d', queues: 2 }, '10.19.0.1/24');
  } finally {
    c.ioctlPtr = ioctlPtr;
    c.errno = errno;
  }
  assert.is(refused, 1, 'asked once with the header, then without');
  assert.is(dev.vnetHeader, false);
  assert.match((await run('ip', ['-d', 'link', 'show', 'dev', dev.name])).stdout, /multi_queue numqueues 2/, 'both queues attached');
  const seen = echoResponder(dev);
  const r = await ping(['-c', '3', '-i', '0.2', '-W', '2', '10.19.0.2']);
  assert.ok(r.ok, r.out);
  assert.match(r.out, /3 received/, 'requests read from the device, crafted replies written into it');
  assert.ok(seen.requests.length >= 3);
  await dev.close();
});

/**
 * Sequence numbers (first 4 payload bytes) of the UDP packets to port 9 that
 * reach `dev`, in arrival order; `alone` gets onPacket's flag for each.
 */
function udpSequences(dev: TunDevice, alone: boolean[] = []): number[] {
  const seqs: number[] = [];
  dev.onPacket((p, isAlone) => {
    if (p[0]! >> 4 === 4 && p[9] === 17 && p.readUInt16BE(22) === 9 && p.length >= 32) {
      seqs.push(p.readUInt32BE(28));
      alone.push(isAlone);
    }
  });
  return seqs;
}

/** Polls `ok` every `everyMs` until it holds; throws after `ms` (and stops polling). */
async function waitFor(what: string, ok: () => boolean, ms = 3_000, everyMs = 5): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Waits until `count()` stops changing for `quietMs` (bounded by `ms`). */
async function waitSettled(what: string, count: () => number, ms = 5_000, quietMs = 100): Promise<void> {
  let last = -1;
  await waitFor(
    what,
    () => {
      const done = count() === last;
      last = count();
      return done;
    },
    ms,
    quietMs,
  );
}

/** A device with `address` (a.b.c.1/24) on it, up; closed after the file if the test does not. */
async function upTun(opts: OpenTunOptions, address: string): Promise<TunDevice> {
  const dev = await withTimeout(openTun(opts), 20_000, 'openTun');
  cleanups.push(() => dev.close());
  await run('ip', ['addr', 'add', address, 'dev', dev.name]);
  await run('ip', ['link', 'set', dev.name, 'up']);
  return dev;
}

/** Sends 64-byte UDP datagrams carrying `seq` to `ip`:9 (routed into a device); the socket is closed after the file. */
function seqSender(ip: string): (seq: number) => void {
  const sock = createSocket('udp4');
  cleanups.push(() => sock.close());
  return (seq) => {
    const b = Buffer.alloc(64);
    b.writeUInt32BE(seq, 0);
    sock.send(b, 9, ip);
  };
}

for (const { vnetHeader, tag } of HEADER_CASES) {
  test(`packets one at a time are read on the main thread; a burst goes to the pump and back, in order${tag}`, async () => {
    const dev = await upTun({ name: vnetHeader ? 'dshrd%d' : 'dshrdn%d', vnetHeader }, '10.13.0.1/24');
    assert.is(dev.vnetHeader, vnetHeader);
    const alone: boolean[] = [];
    const seqs = udpSequences(dev, alone);
    const send = seqSender('10.13.0.2');
    let seq = 0;
    const sparse = async (n: number) => {
      for (let i = 0; i < n; i++) {
        send(seq++);
        await new Promise((r) => setTimeout(r, 5));
      }
    };

    await sparse(5);
    await waitFor('the sparse packets', () => seqs.length === 5);
    let s = dev.stats();
    assert.is(s.rxDirect, s.rxPackets, `one at a time, the main thread reads them all: ${JSON.stringify(s)}`);
    assert.equal(alone, [true, true, true, true, true], 'each read by itself is delivered as alone');

    // A burst: 40 x 50 packets, yielding between chunks so both readers get turns.
    for (let chunk = 0; chunk < 40; chunk++) {
      for (let i = 0; i < 50; i++) send(seq++);
      await new Promise((r) => setImmediate(r));
    }
    const burstEnd = seq;
    // The kernel's queue for the device (500 packets) drops what does not fit.
    await waitSettled('the burst to settle', () => seqs.length);
    s = dev.stats();
    assert.ok(s.rxPackets - s.rxDirect > 0, `the pump read part of the burst: ${JSON.stringify(s)}`);
    assert.ok(alone.slice(5).includes(false), 'what the pump read comes as part of a batch (not alone)');
    assert.ok(seqs.length > 100, `the burst arrived (${seqs.length} of ${burstEnd})`);
    for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i]! > seqs[i - 1]!, `in order: ${seqs[i - 1]} then ${seqs[i]} at ${i}`);

    // Quiet for longer than the pump's hand-back time: the main thread reads again.
    const directBefore = s.rxDirect;
    const seen = seqs.length;
    await sparse(5);
    await waitFor('the sparse packets after the burst', () => seqs.length === seen + 5);
    assert.equal(alone.slice(seen), [true, true, true, true, true], 'alone again');
    // At least our 5 (the kernel may send the device IPv6 router solicitations meanwhile).
    assert.ok(dev.stats().rxDirect >= directBefore + 5, `read on the main thread again: ${JSON.stringify(dev.stats())}`);
    await dev.close();
  });
}

test('after a burst, packets that go on trickling (one every 5 ms) are read on the main thread again', async () => {
  const dev = await upTun({ name: 'dshtr%d' }, '10.16.0.1/24');
  const alone: boolean[] = [];
  const seqs = udpSequences(dev, alone);
  const send = seqSender('10.16.0.2');
  let seq = 0;
  for (let chunk = 0; chunk < 40; chunk++) {
    for (let i = 0; i < 50; i++) send(seq++);
    await new Promise((r) => setImmediate(r));
  }
  // No quiet spell: the trickle starts at once and never pauses for the hand-back window (20 ms).
  for (let i = 0; i < 40; i++) {
    send(seq++);
    await new Promise((r) => setTimeout(r, 5));
  }
  await waitSettled('the trickle to arrive', () => seqs.length);
  assert.ok(alone.includes(false), 'the pump read part of the burst');
  // Waiting for silence would have kept the pump reading every one of them (two wake-ups a packet).
  assert.equal(alone.slice(-10), new Array(10).fill(true), `the trickle's tail is read on the main thread: ${JSON.stringify(alone.slice(-10))}`);
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i]! > seqs[i - 1]!, `in order: ${seqs[i - 1]} then ${seqs[i]} at ${i}`);
  await dev.close();
});

for (const { vnetHeader, tag } of HEADER_CASES) {
  test(`packets written one at a time are written by the main thread; a burst goes through the pump, in order${tag}`, async () => {
    const dev = await upTun({ name: vnetHeader ? 'dshwr%d' : 'dshwrn%d', vnetHeader }, '10.15.0.1/24');
    const sock = createSocket('udp4');
    cleanups.push(() => sock.close());
    const seqs: number[] = [];
    sock.on('message', (m) => seqs.push(m.readUInt32BE(0)));
    await new Promise<void>((r) => sock.bind(0, '10.15.0.1', () => r()));
    const port = sock.address().port;
    // 10.15.0.2:4000 -> us, with a sequence number (UDP checksum 0: none, allowed for IPv4).
    const packet = (seq: number) => {
      const p = udpPacket([10, 15, 0, 1], 64);
      p.set([10, 15, 0, 2], 12);
      p.writeUInt16BE(0, 10);
      p.writeUInt16BE(checksum([p.subarray(0, 20)]), 10);
      p.writeUInt16BE(port, 22);
      p.writeUInt32BE(seq, 28);
      return p;
    };
    let seq = 0;
    const sparse = async (n: number) => {
      for (let i = 0; i < n; i++) {
        dev.write(packet(seq++));
        await new Promise((r) => setTimeout(r, 5));
      }
    };

    await sparse(5);
    await waitFor('the sparse packets', () => seqs.length === 5);
    assert.is(dev.stats().txDirect, 5, `one at a time, the main thread writes them: ${JSON.stringify(dev.stats())}`);

    // 100 small packets fit the socket's receive buffer, which this thread drains only after the loop.
    for (let i = 0; i < 100; i++) assert.ok(dev.write(packet(seq++)), `write ${i} accepted`);
    await waitSettled('the burst', () => seqs.length);
    const s = dev.stats();
    assert.ok(s.txDirect < 5 + 100 && s.txDirect >= 5, `the pump wrote most of the burst: ${JSON.stringify(s)}`);
    assert.equal(seqs, [...Array(105).keys()], 'all of it, in order');

    await new Promise((r) => setTimeout(r, 20));
    const before = dev.stats().txDirect;
    await sparse(5);
    await waitFor('the sparse packets after the burst', () => seqs.length === 110);
    assert.is(dev.stats().txDirect, before + 5, `written by the main thread again: ${JSON.stringify(dev.stats())}`);
    await dev.close();
  });
}

for (const { vnetHeader, tag } of HEADER_CASES) {
  test(`a burst of one TCP flow written into the device reaches the socket whole; the pump writes it as merged runs where it can${tag}`, async () => {
    const dev = await upTun({ name: vnetHeader ? 'dshgro%d' : 'dshgron%d', vnetHeader }, '10.17.0.1/24');
    const received: Buffer[] = [];
    // The reset at the end is expected: the socket's error is not a failure.
    const server = createServer((s) => s.on('data', (d) => received.push(d)).on('error', () => {}));
    cleanups.push(() => server.close());
    await new Promise<void>((r) => server.listen(0, '10.17.0.1', () => r()));
    const port = (server.address() as { port: number }).port;
    // The peer behind the device, 10.17.0.2:40000, is made of crafted packets (no TCP options).
    const us = [10, 17, 0, 2];
    const them = [10, 17, 0, 1];
    const tcp = (seq: number, ack: number, flags: number, payload = Buffer.alloc(0)) => {
      const p = Buffer.alloc(40 + payload.length);
      p[0] = 0x45;
      p.writeUInt16BE(p.length, 2);
      p[6] = 0x40;
      p[8] = 64;
      p[9] = 6;
      p.set(us, 12);
      p.set(them, 16);
      p.writeUInt16BE(checksum([p.subarray(0, 20)]), 10);
      p.writeUInt16BE(40000, 20);
      p.writeUInt16BE(port, 22);
      p.writeUInt32BE(seq >>> 0, 24);
      p.writeUInt32BE(ack >>> 0, 28);
      p[32] = 0x50;
      p[33] = flags;
      p.writeUInt16BE(65535, 34);
      payload.copy(p, 40);
      const pseudo = Buffer.from([...us, ...them, 0, 6, 0, 0]);
      pseudo.writeUInt16BE(20 + payload.length, 10);
      p.writeUInt16BE(checksum([pseudo, p.subarray(20)]), 36);
      return p;
    };
    let synAck: Buffer | undefined;
    dev.onPacket((p) => {
      if (p[9] === 6 && p.readUInt16BE(22) === 40000 && (p[33]! & 0x12) === 0x12) synAck = Buffer.from(p);
    });
    dev.write(tcp(1000, 0, 0x02));
    await waitFor('the SYN-ACK', () => synAck !== undefined);
    const ack = synAck!.readUInt32BE(24) + 1;
    dev.write(tcp(1001, ack, 0x10));
    // Small segments, so that many fit the socket's first window (Linux opens with about ten of its MSS).
    const window = synAck!.readUInt16BE(34);
    const segments = Math.min(120, Math.floor(window / 100));
    assert.ok(segments >= 60, `a window of ${window} bytes takes enough segments for a burst`);
    const data = Buffer.from(Array.from({ length: segments * 100 }, (_, i) => (i * 7) & 0xff));
    for (let i = 0; i < segments; i++) {
      assert.ok(dev.write(tcp(1001 + i * 100, ack, i === segments - 1 ? 0x18 : 0x10, data.subarray(i * 100, (i + 1) * 100))), `segment ${i} accepted`);
    }
    await waitFor('every byte at the socket', () => received.reduce((n, b) => n + b.length, 0) >= data.length);
    assert.equal(Buffer.concat(received), data, 'whole and in order');
    const s = dev.stats();
    if (vnetHeader) assert.ok(s.txMerged > 0 && s.txMerged < segments, `the pump merged runs: ${JSON.stringify(s)}`);
    else assert.is(s.txMerged, 0, `without a vnet header every segment is written on its own: ${JSON.stringify(s)}`);
    assert.ok(s.txPackets - s.txDirect > 0, `the pump wrote part of the burst: ${JSON.stringify(s)}`);
    assert.is(s.txErrors, 0, 'the kernel took every write');
    dev.write(tcp(1001 + data.length, ack, 0x04)); // a reset: the socket is gone before the device
    await dev.close();
  });
}

test('mainThreadReads: false leaves every read to the pump', async () => {
  const dev = await upTun({ name: 'dshrp%d', mainThreadReads: false }, '10.14.0.1/24');
  const seqs = udpSequences(dev);
  const send = seqSender('10.14.0.2');
  for (let i = 0; i < 5; i++) {
    send(i);
    await new Promise((r) => setTimeout(r, 30)); // longer than the hand-back time
  }
  await waitFor('the packets', () => seqs.length === 5);
  assert.equal(seqs, [0, 1, 2, 3, 4]);
  const s = dev.stats();
  assert.is(s.rxDirect, 0, JSON.stringify(s));
  assert.ok(s.rxPackets >= 5, JSON.stringify(s));
  await dev.close();
});

test('a device deleted from outside reports a DshieldError through onError', async () => {
  const dev = await withTimeout(openTun({ name: 'dshgone%d' }), 20_000, 'openTun');
  cleanups.push(() => dev.close());
  const failed = new Promise<unknown>((r) => dev.onError(r));
  dev.onPacket(() => {});
  await run('ip', ['link', 'del', 'dev', dev.name]);
  const err = await withTimeout(failed, 5_000, 'onError');
  assert.ok(isDshieldError(err, ErrorCodes.TUN), String(err));
  assert.match((err as Error).message, new RegExp(`TUN device ${dev.name} failed`));
  await withTimeout(dev.close(), 5_000, 'close after failure');
});

test('write() is bounded: false when the queue is full, extra packets dropped, drain follows', async () => {
  const dev = await upTun({ name: 'dshbp%d', ringBytes: 4096 }, '10.11.0.1/24');
  let drained = 0;
  dev.onDrain(() => drained++);
  const pkt = udpPacket([10, 11, 0, 1], 1000);
  let refusedAt = -1;
  for (let i = 0; i < 50; i++) {
    if (!dev.write(pkt) && refusedAt < 0) refusedAt = i;
  }
  // The first packets of a burst are written directly; the rest go to the 4 KiB ring.
  const queued = refusedAt - dev.stats().txDirect;
  assert.ok(queued > 0 && queued < 20, `write said stop at packet ${refusedAt}, the ${queued}th queued one`);
  assert.ok(dev.stats().txDropped > 0, 'packets beyond the bound were dropped, not queued');
  await waitFor('drain', () => drained > 0, 3_000, 10);
  assert.ok(dev.write(udpPacket([10, 11, 0, 1], 10)), 'writes accepted again after drain');
  await dev.close();
});

test('net config: every change is undone exactly (routes, addresses, DNS, nftables, forwarding)', async () => {
  assert.is(readFileSync(RESOLV_PATH, 'utf8'), NETNS_RESOLV);
  const before = await snapshot();
  const dev = await withTimeout(openTun({ name: 'dshnc%d' }), 20_000, 'openTun');
  cleanups.push(() => dev.close());
  const stateDir = mkdtempSync(join(tmpdir(), 'dshield-state-'));
  cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
  const net = await NetChanges.start({ stateDir, name: 'undo-test' });
  await net.trackDevice(dev.name);
  await net.addAddress(dev.name, '10.66.0.2/24');
  await net.addAddress(dev.name, 'fd66::2/64');
  await net.linkUp(dev.name);
  const { hop } = await net.routeToServer(WEB);
  assert.is(hop.gateway, topo.addr.serverClientSide);
  assert.is(hop.dev, topo.dev.client);
  await net.routeExcluded(['192.0.2.0/24']); // no route for it here: skipped
  await net.routeAllThrough(dev.name, { ipv6: true });
  await net.routeIncluded(dev.name, ['198.51.100.0/24']);
  await net.setDns(['10.66.0.1', 'fd66::1'], { search: ['vpn.test'], path: RESOLV_PATH });
  await net.killSwitch({ tunDev: dev.name, servers: [{ ip: WEB, port: 5201 }], allow: ['10.200.1.0/24'] });
  await net.enableForwarding({ ipv6: true });
  await net.serverNat({ tunDev: dev.name, subnet: '10.66.0.0/24', subnet6: 'fd66::/64', egressDev: topo.dev.client });
  // An identical route that already exists is not ours: adding it is a no-op and undo leaves it.
  const existing = await net.addRoute({ to: '10.200.1.0/24', dev: topo.dev.client });
  await existing();

  const applied = await snapshot();
  assert.match(applied.route4, new RegExp(`0\\.0\\.0\\.0/1 dev ${dev.name}`));
  assert.match(applied.route4, new RegExp(`128\\.0\\.0\\.0/1 dev ${dev.name}`));
  assert.match(applied.route4, new RegExp(`${WEB.replace(/\./g, '\\.')} via ${topo.addr.serverClientSide.replace(/\./g, '\\.')} dev ${topo.dev.client}`));
  assert.match(applied.route4, /198\.51\.100\.0\/24 dev/);
  assert.match(applied.route6, new RegExp(`::/1 dev ${dev.name}`));
  assert.match(applied.route6, new RegExp(`8000::/1 dev ${dev.name}`));
  assert.ok(applied.resolv.endsWith('nameserver 10.66.0.1\nnameserver fd66::1\nsearch vpn.test\n'), applied.resolv);
  assert.match(applied.nft, /table inet dshield_killswitch/);
  assert.match(applied.nft, /table inet dshield_nat/);
  assert.match(applied.nft, /masquerade/);
  assert.is(applied.forward.trim(), '1');
  const journalPath = join(stateDir, `undo-test.${currentNetns()}.json`);
  assert.ok(existsSync(journalPath), 'journal written while changes are in place');
  const journal = JSON.parse(readFileSync(journalPath, 'utf8')) as { pid: number; records: unknown[] };
  assert.is(journal.pid, process.pid);
  assert.is(journal.records.length, net.records.length);

  const errors = await net.undoAll();
  assert.equal(errors, []);
  await dev.close();
  const after = await snapshot();
  for (const key of Object.keys(before)) assert.fixture(after[key]!, before[key]!, key);
  assert.not.ok(existsSync(journalPath), 'journal removed once all is undone');
});

test('IPv6 leak guard and the MTU of a device we do not own come back too', async () => {
  const before = await snapshot();
  const mtuBefore = readFileSync(`/sys/class/net/${topo.dev.client}/mtu`, 'utf8').trim();
  const net = await NetChanges.start({ stateDir: false });
  await net.blockIpv6();
  await net.setMtu(topo.dev.client, 1400);
  assert.match((await run('ip', ['-6', 'route'])).stdout, /unreachable ::\/1/);
  const blocked = await run('ip', ['-6', 'route', 'get', topo.addr.web6], { allowFail: true });
  assert.match(blocked.stdout + blocked.stderr, /unreachable|No route to host/i, 'IPv6 beyond the link fails at once');
  assert.is(readFileSync(`/sys/class/net/${topo.dev.client}/mtu`, 'utf8').trim(), '1400');
  assert.equal(await net.undoAll(), []);
  assert.is(readFileSync(`/sys/class/net/${topo.dev.client}/mtu`, 'utf8').trim(), mtuBefore);
  const after = await snapshot();
  assert.fixture(after.route6!, before.route6!);
  const open = await run('ip', ['-6', 'route', 'get', topo.addr.web6]);
  assert.match(open.stdout, new RegExp(`via ${topo.addr.serverClientSide6}`), 'routed normally again');
});

test('DNS: a symlinked resolv.conf comes back as the same symlink; a file rewritten by someone else is left alone', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'dshield-resolv-'));
  cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
  const target = join(dir, 'stub-resolv.conf');
  writeFileSync(target, 'nameserver 127.0.0.53\n');
  const path = join(dir, 'resolv.conf');
  symlinkSync(target, path);

  const net = await NetChanges.start({ stateDir: join(dir, 'state'), name: 'dns' });
  await net.setDns(['10.66.0.1'], { path });
  assert.not.ok(lstatSync(path).isSymbolicLink(), 'replaced by a regular file');
  assert.match(readFileSync(path, 'utf8'), /nameserver 10\.66\.0\.1/);
  assert.is(readFileSync(target, 'utf8'), 'nameserver 127.0.0.53\n', "the resolver manager's file is untouched");
  assert.equal(await net.undoAll(), []);
  assert.ok(lstatSync(path).isSymbolicLink());
  assert.is(readlinkSync(path), target);

  const file = join(dir, 'plain.conf');
  writeFileSync(file, 'nameserver 10.1.1.1\n', { mode: 0o640 });
  const net2 = await NetChanges.start({ stateDir: join(dir, 'state'), name: 'dns2' });
  await net2.setDns(['10.66.0.1'], { path: file });
  writeFileSync(file, 'nameserver 10.2.2.2\n'); // a DHCP client rewrote it meanwhile
  assert.equal(await net2.undoAll(), []);
  assert.is(readFileSync(file, 'utf8'), 'nameserver 10.2.2.2\n', 'newer content from someone else wins');
});

test('kill switch: blocks everything but loopback, the TUN and the server ip:port; undo opens again', async () => {
  await exec(topo.ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1']);
  cleanups.push(() => exec(topo.ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=0']));
  // Two TCP ports in web: 5201 plays the VPN server, 5202 anything else.
  const serverCode = `const net = require('net'); for (const p of [5201, 5202]) net.createServer((s) => s.end('hi')).listen(p, ${JSON.stringify(WEB)}); console.log('LISTENING');`;
  const web: ChildProcess = spawnIn(topo.ns.web, process.execPath, ['-e', serverCode]);
  cleanups.push(() => web.kill('SIGKILL'));
  await withTimeout(new Promise((r) => web.stdout!.on('data', (c: Buffer) => c.toString().includes('LISTENING') && r(null))), 10_000, 'web listeners');
  const local: Server = createServer((s) => s.end('hi')).listen(0, '127.0.0.1');
  cleanups.push(() => local.close());
  await new Promise((r) => local.once('listening', r));
  const localPort = (local.address() as { port: number }).port;

  const dev = await withTimeout(openTun({ name: 'dshks%d' }), 20_000, 'openTun');
  cleanups.push(() => dev.close());
  const net = await NetChanges.start({ stateDir: false });
  await net.addAddress(dev.name, '10.12.0.1/24');
  await net.linkUp(dev.name);
  echoResponder(dev);

  assert.ok((await ping(['-c', '1', '-W', '2', WEB])).ok, 'web reachable before');
  assert.is(await tcpProbe(WEB, 5202), 'ok');

  await net.killSwitch({ tunDev: dev.name, servers: [{ ip: WEB, port: 5201, protocols: ['tcp'] }] });
  const blocked = await ping(['-c', '1', '-W', '2', WEB]);
  assert.not.ok(blocked.ok, `ping to web must be blocked: ${blocked.out}`);
  assert.is(await tcpProbe(WEB, 5201), 'ok', 'the server ip:port stays reachable');
  assert.is.not(await tcpProbe(WEB, 5202), 'ok', 'any other port is blocked');
  assert.is(await tcpProbe('127.0.0.1', localPort), 'ok', 'loopback allowed');
  assert.ok((await ping(['-c', '1', '-W', '2', '10.12.0.2'])).ok, 'traffic into the TUN allowed');

  assert.equal(await net.undoAll(), []);
  assert.ok((await ping(['-c', '1', '-W', '2', WEB])).ok, 'web reachable again after undo');
  assert.is(await tcpProbe(WEB, 5202), 'ok');
  await dev.close();
});

test('crash leftovers: a SIGKILLed run is cleaned up by the next start', async () => {
  const before = await snapshot();
  const stateDir = mkdtempSync(join(tmpdir(), 'dshield-crash-'));
  cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
  const code = `
    import { openTun } from ${JSON.stringify(join(ROOT, 'core/tun/device.ts'))};
    import { NetChanges } from ${JSON.stringify(join(ROOT, 'core/tun/netconfig.ts'))};
    const dev = await openTun({ name: 'dshcrash%d' });
    const net = await NetChanges.start({ stateDir: ${JSON.stringify(stateDir)}, name: 'crash' });
    await net.trackDevice(dev.name);
    await net.addAddress(dev.name, '10.77.0.2/24');
    await net.linkUp(dev.name);
    await net.routeToServer(${JSON.stringify(WEB)});
    await net.routeAllThrough(dev.name);
    await net.setDns(['10.77.0.53'], { path: ${JSON.stringify(RESOLV_PATH)} });
    await net.killSwitch({ tunDev: dev.name, servers: [{ ip: ${JSON.stringify(WEB)}, port: 5201 }] });
    await net.enableForwarding();
    console.log('APPLIED ' + dev.name);
    setInterval(() => {}, 1000);`;
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  cleanups.push(() => child.kill('SIGKILL'));
  let out = '';
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  await withTimeout(
    new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (c: Buffer) => {
        out += c.toString();
        if (out.includes('APPLIED')) resolve();
      });
      child.once('exit', () => reject(new Error(`the crash child exited early: ${out}`)));
    }),
    30_000,
    'the crash child to apply its changes',
  );
  child.kill('SIGKILL');
  await withTimeout(new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r(null) : child.once('exit', r))), 5_000, 'SIGKILL');

  const left = await snapshot();
  assert.match(left.nft, /dshield_killswitch/, 'the kill switch outlived the crash');
  assert.match(left.resolv, /10\.77\.0\.53/, 'resolv.conf still ours');
  assert.is(left.forward.trim(), '1');
  assert.match(left.route4, new RegExp(`${WEB.replace(/\./g, '\\.')} via`), 'host route to the server left behind');
  const crashState = join(stateDir, `crash.${currentNetns()}.json`);
  assert.ok(existsSync(crashState));
  assert.throws(() => StateJournal.create(stateDir, 'crash'), /left over from a crashed run/);

  const reports = await recoverLeftovers(stateDir);
  assert.is(reports.length, 1);
  assert.is(reports[0]!.failed.length, 0, reports[0]!.failed.join('; '));
  assert.ok(reports[0]!.undone.length >= 5, reports[0]!.undone.join('; '));
  const after = await snapshot();
  for (const key of Object.keys(before)) assert.fixture(after[key]!, before[key]!, key);
  assert.not.ok(existsSync(crashState), 'state file removed');
  assert.equal(readdirSync(stateDir), [], 'backups removed too');
  assert.equal(await recoverLeftovers(stateDir), [], 'nothing left to recover');
});

test('a live owner keeps its state: a second instance of the same name is refused', async () => {
  const stateDir = mkdtempSync(join(tmpdir(), 'dshield-live-'));
  cleanups.push(() => rmSync(stateDir, { recursive: true, force: true }));
  const first = await NetChanges.start({ stateDir, name: 'one' });
  try {
    await NetChanges.start({ stateDir, name: 'one' });
    assert.unreachable('second start accepted');
  } catch (err) {
    assert.ok(err instanceof DshieldError && /another dshield \(pid \d+\) is running/.test(err.message), String(err));
  }
  assert.equal(await recoverLeftovers(stateDir), [], 'a live owner is not recovered');
  await first.undoAll();
  // A dead run's file from another network namespace is not ours to undo here.
  const foreign = join(stateDir, 'other.4026531840.json');
  const record = { kind: 'sysctl', path: '/proc/sys/net/ipv4/ip_forward', previous: '1\n' };
  writeFileSync(foreign, JSON.stringify({ version: 1, name: 'other', pid: 999999999, pidStart: null, bootId: null, created: '', records: [record] }));
  assert.equal(await recoverLeftovers(stateDir), []);
  assert.ok(existsSync(foreign));
  assert.is(readFileSync('/proc/sys/net/ipv4/ip_forward', 'utf8').trim(), '0');
});

test('nft scripts refuse values that could inject syntax', () => {
  assert.throws(() => killSwitchScript({ tunDev: 'tun0"; flush ruleset', servers: [] }), /invalid interface name/);
  assert.throws(() => killSwitchScript({ tunDev: 'tun0', servers: [{ ip: '1.2.3.4; accept', port: 1 }] }), /not an IP address/);
  assert.throws(() => killSwitchScript({ tunDev: 'tun0', servers: [{ ip: '1.2.3.4', port: 70000 }] }), /invalid server port/);
  assert.throws(() => serverNatScript({ tunDev: 'tun0', subnet: '10.0.0.0/8 accept' }), (e: unknown) => isDshieldError(e, ErrorCodes.TUN));
  assert.match(serverNatScript({ tunDev: 'tun0', subnet: '10.66.0.9/24' }), /ip saddr 10\.66\.0\.0\/24 oifname != "tun0" masquerade/);
});

test.run();
