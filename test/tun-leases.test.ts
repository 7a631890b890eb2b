/**
 * TUN mode with two clients, in network namespaces (tcp transport):
 *
 *   client ns  (10.200.1.2) --veth--+
 *                                   server ns --veth-- web ns (10.200.2.2, 10.200.2.3)
 *   client2 ns (10.200.3.2) --veth--+
 *
 * - two clients get distinct addresses from the pool; each gets the same one
 *   again after the server restarts (persisted leases), whatever order they
 *   come back in;
 * - the server's egress deny list applies to forwarded packets: only the
 *   allowed web address is reachable through the tunnel, the other private
 *   one is not; clients cannot reach each other (clientToClient: false);
 * - crash cleanup: a client killed with SIGKILL leaves its kill switch and
 *   DNS change behind, and the next start with the same state dir removes
 *   them, so after a clean exit the namespace is as before.
 * Needs root, /dev/net/tun, ip, nft, iperf3, ping, curl and dig; skips (exit 77) elsewhere.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createNamespace, createTopology, deleteNamespace, exec, run, skipUnlessNetns, writeNetnsEtc, type Topology } from './helpers/netns.ts';
import {
  POOL_PREFIX,
  TUN_E2E_TOOLS,
  WEB_HTTP_PORT,
  clientTunConfig,
  curlIn,
  hostResolvFingerprint,
  netnsResolvIsPrivate,
  newKeys,
  pingOk,
  serverTunConfig,
  snapshotNetns,
  startDshield,
  startWebHost,
  stateLeftovers,
  waitForDns,
  waitForTunUp,
  waitRestored,
  type NetnsSnapshot,
  type NsProc,
  type TestKeys,
  type WebHost,
} from './helpers/tun-e2e.ts';

skipUnlessNetns(TUN_E2E_TOOLS);

const TRANSPORT = 'tcp';
/** A second address on the web host that the server's egress policy does not allow. */
const WEB_DENIED = '10.200.2.3';
const CLIENT2 = { addr: '10.200.3.2', serverSide: '10.200.3.1', dev: 'veth-srv', serverDev: 'veth-cli2' };
const RESOLV = 'nameserver 10.200.1.1\n# the client namespace resolver before dshield (test)\n';

const hostResolvBefore = hostResolvFingerprint();
const pushDns = netnsResolvIsPrivate();
const work = mkdtempSync(join(tmpdir(), 'dshield-tun-leases-'));
const serverDir = join(work, 'server');
const serverKey = newKeys();

interface TestClient {
  name: string;
  key: TestKeys;
  ns: string;
  dir: string;
  proc?: NsProc;
  address?: string;
  before?: NetnsSnapshot;
}

let topo: Topology;
let client2Ns: string;
let web: WebHost;
let server: NsProc | undefined;
let serverBefore: NetnsSnapshot;
const alice: TestClient = { name: 'alice', key: newKeys(), ns: '', dir: join(work, 'alice') };
const bob: TestClient = { name: 'bob', key: newKeys(), ns: '', dir: join(work, 'bob') };
const firstAddresses = new Map<string, string>();

async function addSecondClientNamespace(t: Topology): Promise<string> {
  const ns = await createNamespace(`${t.id}-client2`);
  await run('ip', ['link', 'add', CLIENT2.dev, 'netns', ns, 'type', 'veth', 'peer', 'name', CLIENT2.serverDev, 'netns', t.ns.server]);
  await run('ip', ['-n', ns, '-batch', '-'], {
    input: [`addr add ${CLIENT2.addr}/24 dev ${CLIENT2.dev}`, `link set ${CLIENT2.dev} up`, `route add default via ${CLIENT2.serverSide}`, ''].join('\n'),
  });
  await run('ip', ['-n', t.ns.server, '-batch', '-'], {
    input: [`addr add ${CLIENT2.serverSide}/24 dev ${CLIENT2.serverDev}`, `link set ${CLIENT2.serverDev} up`, ''].join('\n'),
  });
  return ns;
}

async function startServer(): Promise<NsProc> {
  const proc = startDshield(
    topo.ns.server,
    'server',
    serverDir,
    serverTunConfig({
      transport: TRANSPORT,
      listenIp: topo.addr.serverClientSide,
      key: serverKey,
      clients: [alice, bob].map((c) => ({ name: c.name, publicKey: c.key.publicKey })),
      // Only the web host's first address: the second stays denied (it is private).
      allow: [`${topo.addr.web}/32`],
      dns: [topo.addr.web],
    }),
  );
  await proc.waitFor(/listening on \S+/, 30_000);
  return proc;
}

async function startClient(c: TestClient, tun: Record<string, unknown>): Promise<string> {
  // Both dial the server's 10.200.1.1; bob's packets get there through his own link (10.200.3.1).
  c.proc = startDshield(
    c.ns,
    'client',
    c.dir,
    clientTunConfig({ transport: TRANSPORT, serverIp: topo.addr.serverClientSide, serverPublicKey: serverKey.publicKey, key: c.key, tun }),
  );
  const up = await waitForTunUp(c.ns, c.proc, { fullTunnel: true, ms: 30_000 });
  c.address = up.address;
  return up.address;
}

test.before(async () => {
  topo = await createTopology();
  client2Ns = await addSecondClientNamespace(topo);
  alice.ns = topo.ns.client;
  bob.ns = client2Ns;
  // Before any client runs: DNS changes must land in these files, never the host's.
  writeNetnsEtc(alice.ns, { 'resolv.conf': RESOLV });
  writeNetnsEtc(bob.ns, { 'resolv.conf': RESOLV });
  await exec(topo.ns.web, 'ip', ['addr', 'add', `${WEB_DENIED}/24`, 'dev', topo.dev.web]);
  web = await startWebHost(topo.ns.web, '0.0.0.0');
  [alice.before, bob.before, serverBefore] = await Promise.all([snapshotNetns(alice.ns), snapshotNetns(bob.ns), snapshotNetns(topo.ns.server)]);
});

test.after(async () => {
  await Promise.allSettled([alice.proc?.stop(), bob.proc?.stop(), server?.stop(), web?.stop()]);
  if (client2Ns) deleteNamespace(client2Ns);
  topo?.cleanup();
  rmSync(work, { recursive: true, force: true });
});

test('two clients get distinct addresses from the pool', async () => {
  server = await startServer();
  const [a, b] = await Promise.all([startClient(alice, { dns: pushDns }), startClient(bob, { dns: false })]);
  for (const addr of [a, b]) assert.ok(addr.startsWith(POOL_PREFIX) && addr !== `${POOL_PREFIX}1`, `assigned ${addr}`);
  assert.is.not(a, b, 'distinct addresses');
  firstAddresses.set('alice', a);
  firstAddresses.set('bob', b);
});

test('the egress deny list applies to forwarded packets: the allowed web address works, the denied one does not', async () => {
  assert.ok(alice.proc?.running() && bob.proc?.running(), 'both clients are up (an earlier step failed)');
  const allowed = await curlIn(alice.ns, `http://${topo.addr.web}:${WEB_HTTP_PORT}/allowed`);
  assert.ok(allowed.ok, `the allowed address works through the tunnel: ${allowed.err}`);
  assert.equal(web.httpSources('/allowed'), [topo.addr.serverWebSide]);
  const denied = await curlIn(alice.ns, `http://${WEB_DENIED}:${WEB_HTTP_PORT}/denied`, 3);
  assert.not.ok(denied.ok, 'a private address outside server.egress.allow is not reachable through the tunnel');
  assert.not.ok((await pingOk(alice.ns, WEB_DENIED, 2, 1)).ok, 'nor by ping');
  assert.equal(web.httpSources('/denied'), [], 'the denied request never arrived');
});

test('clients cannot reach each other (clientToClient: false)', async () => {
  assert.ok(alice.address && bob.address, 'both clients are up (an earlier step failed)');
  assert.ok((await pingOk(bob.ns, topo.addr.web, 1, 2)).ok, "bob's tunnel works");
  assert.not.ok((await pingOk(alice.ns, bob.address!, 2, 1)).ok, "alice cannot ping bob's tunnel address");
});

test('leases persist: after a server restart each client gets its address again, in any order', async () => {
  assert.ok(firstAddresses.size === 2, 'both clients were up (an earlier step failed)');
  assert.is(await alice.proc!.stop(), 0, 'alice exits 0');
  assert.is(await bob.proc!.stop(), 0, 'bob exits 0');
  assert.is(await server!.stop(), 0, 'the server exits 0');
  const leases = join(serverDir, 'keys', 'leases.json');
  assert.ok(existsSync(leases), `the server wrote ${leases}`);
  const text = readFileSync(leases, 'utf8');
  assert.ok(text.includes(firstAddresses.get('alice')!) && text.includes(firstAddresses.get('bob')!), `both leases are in the file: ${text}`);

  server = await startServer();
  // bob first this time: a pool handing out addresses in arrival order would swap them.
  assert.is(await startClient(bob, { dns: false }), firstAddresses.get('bob'), 'bob got his address again');
  assert.is(await startClient(alice, { dns: pushDns, killSwitch: true }), firstAddresses.get('alice'), 'alice got hers again');
  // The next test kills alice: let her finish setting up first (DNS comes last).
  if (pushDns) assert.ok(await waitForDns(alice.ns, topo.addr.web), 'alice set the pushed resolver');
});

test('a client killed with SIGKILL leaves its changes behind; the next start removes them', async () => {
  assert.ok(alice.proc?.running(), 'alice is up with the kill switch (an earlier step failed)');
  await alice.proc!.kill();
  const left = await snapshotNetns(alice.ns);
  assert.ok(left['nft list ruleset']!.trim() !== '', 'the dead client left its kill switch in place');
  if (pushDns) assert.ok(left['/etc/netns/<ns>/resolv.conf'] !== RESOLV, 'and its DNS change');
  assert.ok(stateLeftovers(join(alice.dir, 'state')).length > 0, 'and a journal in its state dir');
  // Its kill switch still holds: nothing gets out directly.
  assert.not.ok((await pingOk(alice.ns, topo.addr.serverClientSide, 1, 1)).ok, 'the leftover kill switch still blocks');

  assert.is(await startClient(alice, { dns: pushDns, killSwitch: true }), firstAddresses.get('alice'), 'the next start comes up');
  assert.ok((await pingOk(alice.ns, topo.addr.web, 2, 2)).ok, 'and its tunnel works');
  assert.is(await alice.proc!.stop(), 0, 'alice exits 0');
  const diff = await waitRestored(alice.ns, alice.before!);
  assert.is(diff, '', `alice's namespace differs from before any client ran:\n${diff}`);
  assert.equal(stateLeftovers(join(alice.dir, 'state')), [], 'no journal left');
});

test('after both clients and the server exit, every namespace is as before', async () => {
  assert.is(await bob.proc!.stop(), 0, 'bob exits 0');
  assert.is(await server!.stop(), 0, 'the server exits 0');
  const bobDiff = await waitRestored(bob.ns, bob.before!);
  assert.is(bobDiff, '', `bob's namespace differs:\n${bobDiff}`);
  const serverDiff = await waitRestored(topo.ns.server, serverBefore);
  assert.is(serverDiff, '', `the server namespace differs:\n${serverDiff}`);
  assert.equal(stateLeftovers(join(serverDir, 'state')), [], 'no server journal left');
});

test("the host's /etc/resolv.conf is unchanged", () => {
  assert.is(hostResolvFingerprint(), hostResolvBefore);
});

test.run();
