/**
 * The TUN-mode end-to-end tests for one transport, shared by
 * test/tun-e2e-{tcp,ws,udp}.test.ts (one file per transport keeps each file
 * short and lets them fail separately).
 *
 *   client ns (10.200.1.2) --veth-- (10.200.1.1) server ns (10.200.2.1) --veth-- (10.200.2.2) web ns
 *
 * The real CLI runs in the client and server namespaces, each with its own
 * config dir and TUN state dir; the web namespace runs an HTTP server and a
 * DNS responder that log source addresses (test/fixtures/tun-web-host.ts) and
 * one-shot iperf3 servers. With no proxy configured anywhere, the client's
 * traffic must reach the web host from the server's address; after each
 * process exits, its namespace must be exactly as before; with the kill
 * switch on and the server gone, no packet from the client namespace may
 * reach the web host by any path, although (a control step shows) the plain
 * route would.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createTopology, exec, skipUnlessNetns, SKIP_EXIT_CODE, writeNetnsEtc, type Topology } from './netns.ts';
import {
  DNS_TEST_ANSWER,
  DNS_TEST_NAME,
  LeakCounter,
  POOL,
  POOL_PREFIX,
  TUN_E2E_TOOLS,
  WEB_HTTP_PORT,
  clientTunConfig,
  curlIn,
  digIn,
  eventually,
  hostResolvFingerprint,
  iperf3,
  mbit,
  netnsResolvIsPrivate,
  newKeys,
  pingOk,
  serverTunConfig,
  snapshotNetns,
  startDshield,
  startWebHost,
  stateLeftovers,
  transportPending,
  waitForDns,
  waitForTunUp,
  waitRestored,
  type NetnsSnapshot,
  type NsProc,
  type TunUp,
  type WebHost,
} from './tun-e2e.ts';

/** The resolv.conf the client namespace starts with (bind-mounted over /etc/resolv.conf by ip netns exec). */
const CLIENT_RESOLV = 'nameserver 10.200.1.1\n# the client namespace resolver before dshield (test)\n';

/** Registers the tests (the calling file runs them with test.run()); exits 77 when they cannot run here. */
export function defineTunTransportTests(transport: string): void {
  skipUnlessNetns(TUN_E2E_TOOLS);
  const pending = transportPending(transport);
  if (pending !== undefined) {
    console.log(`skipped: ${pending}`);
    process.exit(SKIP_EXIT_CODE);
  }

  const hostResolvBefore = hostResolvFingerprint();
  // Where the host's /etc/resolv.conf is a symlink the client's DNS change
  // could reach the host (see netnsResolvIsPrivate): test DNS without it then.
  const pushDns = netnsResolvIsPrivate();
  const serverKey = newKeys();
  const clientKey = newKeys();
  const work = mkdtempSync(join(tmpdir(), `dshield-tun-${transport}-`));
  const serverDir = join(work, 'server');
  const clientDir = join(work, 'client');
  let topo: Topology;
  let web: WebHost;
  let server: NsProc | undefined;
  let client: NsProc | undefined;
  let up: TunUp | undefined;
  let firstAddress: string | undefined;
  let clientBefore: NetnsSnapshot;
  let serverBefore: NetnsSnapshot;
  let serverBeforeKillSwitch: NetnsSnapshot | undefined;
  let leaks: LeakCounter;
  let iperfPort = 5201;

  const startServer = async (): Promise<NsProc> => {
    const proc = startDshield(
      topo.ns.server,
      'server',
      serverDir,
      serverTunConfig({
        transport,
        listenIp: topo.addr.serverClientSide,
        key: serverKey,
        clients: [{ name: 'alice', publicKey: clientKey.publicKey }],
        // The web host's subnet is private: the egress deny list would drop it.
        allow: ['10.200.2.0/24'],
        dns: [topo.addr.web],
      }),
    );
    await proc.waitFor(/listening on \S+/, 30_000);
    return proc;
  };
  const startClient = async (killSwitch: boolean): Promise<{ proc: NsProc; up: TunUp }> => {
    const proc = startDshield(
      topo.ns.client,
      'client',
      clientDir,
      clientTunConfig({
        transport,
        serverIp: topo.addr.serverClientSide,
        serverPublicKey: serverKey.publicKey,
        key: clientKey,
        tun: { dns: pushDns, killSwitch },
      }),
    );
    try {
      return { proc, up: await waitForTunUp(topo.ns.client, proc, { fullTunnel: true, ms: 30_000 }) };
    } catch (err) {
      await proc.stop();
      throw err;
    }
  };
  const needClient = () => assert.ok(client?.running() && up, 'the TUN client is not running (an earlier step failed)');

  test.before(async () => {
    topo = await createTopology();
    // Before any client runs: its DNS change must land in this file, never the host's.
    writeNetnsEtc(topo.ns.client, { 'resolv.conf': CLIENT_RESOLV });
    web = await startWebHost(topo.ns.web, topo.addr.web);
    leaks = new LeakCounter(topo.ns.web, ['10.200.1.0/24', POOL], ['fd00:200:1::/64']);
    [clientBefore, serverBefore] = await Promise.all([snapshotNetns(topo.ns.client), snapshotNetns(topo.ns.server)]);
  });

  test.after(async () => {
    await Promise.allSettled([client?.stop(), server?.stop(), web?.stop()]);
    topo?.cleanup();
    rmSync(work, { recursive: true, force: true });
  });

  test(`${transport}: the server starts in TUN mode (forwarding on, NAT in place)`, async () => {
    server = await startServer();
    const fwd = async () => (await exec(topo.ns.server, 'sysctl', ['-n', 'net.ipv4.ip_forward'])).stdout.trim() === '1';
    assert.ok(await eventually(fwd, 10_000), 'net.ipv4.ip_forward is 1 in the server namespace');
    const rules = (await exec(topo.ns.server, 'nft', ['list', 'ruleset'])).stdout;
    assert.match(rules, /masquerade/, `NAT (masquerade) rules in the server namespace:\n${rules}`);
  });

  test(`${transport}: the client comes up with a pool address and routes everything through its TUN`, async () => {
    assert.ok(server?.running(), 'the server is not running');
    ({ proc: client, up } = await startClient(false));
    firstAddress = up.address;
    assert.ok(up.address.startsWith(POOL_PREFIX) && up.address !== `${POOL_PREFIX}1`, `assigned ${up.address}`);
    const viaWeb = (await exec(topo.ns.client, 'ip', ['route', 'get', topo.addr.web])).stdout;
    assert.match(viaWeb, new RegExp(`dev ${up.dev}\\b`), `the web host is routed through the TUN: ${viaWeb}`);
    const viaServer = (await exec(topo.ns.client, 'ip', ['route', 'get', topo.addr.serverClientSide])).stdout;
    assert.match(viaServer, new RegExp(`dev ${topo.dev.client}\\b`), `the server itself stays on the real interface: ${viaServer}`);
  });

  test(`${transport}: curl with no proxy reaches the web host, which sees the server's address`, async () => {
    needClient();
    const path = `/through-tun-${transport}`;
    const r = await curlIn(topo.ns.client, `http://${topo.addr.web}:${WEB_HTTP_PORT}${path}`);
    assert.ok(r.ok, `curl failed: ${r.err}`);
    assert.is(r.body, 'hello from the web host\n');
    const sources = web.httpSources(path);
    assert.equal(sources, [topo.addr.serverWebSide], `the web host saw ${sources.join(', ')}`);
    assert.not.ok(web.httpSources().includes(topo.addr.client), 'the client LAN address never reaches the web host');
    assert.not.ok(web.httpSources().includes(up!.address), 'the client tunnel address never reaches the web host');
  });

  test(`${transport}: ping through the tunnel`, async () => {
    needClient();
    const r = await pingOk(topo.ns.client, topo.addr.web, 3, 2);
    assert.ok(r.ok, r.out);
  });

  test(`${transport}: iperf3 TCP through the tunnel`, async () => {
    needClient();
    const r = await iperf3(topo.ns.client, topo.ns.web, topo.addr.web, { port: iperfPort++, seconds: 2 });
    assert.is(r.error, undefined, r.error);
    assert.ok(r.bytesReceived > 0, `received ${r.bytesReceived} bytes`);
    console.log(`  ${transport}: iperf3 TCP ${mbit(r.bitsPerSecond)} (${r.bytesReceived} bytes)`);
  });

  test(`${transport}: iperf3 UDP through the tunnel`, async () => {
    needClient();
    const r = await iperf3(topo.ns.client, topo.ns.web, topo.addr.web, { port: iperfPort++, seconds: 2, udp: true, bandwidth: '50M', length: 1200 });
    assert.is(r.error, undefined, r.error);
    assert.ok(r.bytesReceived > 0, `received ${r.bytesReceived} bytes`);
    console.log(`  ${transport}: iperf3 UDP ${mbit(r.bitsPerSecond)} received of 50 Mbit/s sent, loss ${r.lostPercent?.toFixed(2)} %`);
  });

  test(`${transport}: DNS goes to the pushed resolver through the tunnel`, async () => {
    needClient();
    const before = web.dnsSources().length;
    const direct = await digIn(topo.ns.client, DNS_TEST_NAME, topo.addr.web);
    assert.is(direct.answer, DNS_TEST_ANSWER, `dig @${topo.addr.web}: ${direct.out}`);
    if (pushDns) {
      const resolvFile = `/etc/netns/${topo.ns.client}/resolv.conf`;
      assert.ok(await waitForDns(topo.ns.client, topo.addr.web), `the client put the pushed resolver ${topo.addr.web} into its resolv.conf (${resolvFile})`);
      const plain = await digIn(topo.ns.client, DNS_TEST_NAME);
      assert.is(plain.answer, DNS_TEST_ANSWER, `a lookup through the namespace's resolv.conf: ${plain.out}`);
    } else {
      console.log('  (the host /etc/resolv.conf is a symlink: the client runs with dns: false, and only dig @resolver is tested)');
    }
    const sources = web.dnsSources().slice(before);
    assert.ok(sources.length >= (pushDns ? 2 : 1), `queries seen: ${sources.join(', ')}`);
    assert.ok(
      sources.every((s) => s === topo.addr.serverWebSide),
      `every query arrives from the server's address ${topo.addr.serverWebSide}: ${sources.join(', ')}`,
    );
  });

  test(`${transport}: after the client exits, its namespace's routes, DNS and nftables are as before`, async () => {
    needClient();
    const code = await client!.stop();
    assert.is(code, 0, `the client exits 0 on SIGTERM; output:\n${client!.output()}`);
    const diff = await waitRestored(topo.ns.client, clientBefore);
    assert.is(diff, '', `the client namespace differs from before the client started:\n${diff}`);
    assert.equal(stateLeftovers(join(clientDir, 'state')), [], 'a clean exit leaves no journal in the state dir');
  });

  test(`${transport}: after the server exits, its namespace's nftables and forwarding are as before`, async () => {
    assert.ok(server?.running(), 'the server is not running');
    const code = await server!.stop();
    assert.is(code, 0, `the server exits 0 on SIGTERM; output:\n${server!.output()}`);
    const diff = await waitRestored(topo.ns.server, serverBefore);
    assert.is(diff, '', `the server namespace differs from before the server started:\n${diff}`);
    assert.equal(stateLeftovers(join(serverDir, 'state')), [], 'a clean exit leaves no journal in the state dir');
  });

  test(`${transport}: kill switch control: with forwarding on in the server, the plain route reaches the web host`, async () => {
    // Turned on by the test, not by dshield: now, without a kill switch, the
    // client namespace's own default route leads to the web host directly.
    await exec(topo.ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1', 'net.ipv6.conf.all.forwarding=1']);
    serverBeforeKillSwitch = await snapshotNetns(topo.ns.server);
    await leaks.reset();
    const path = `/direct-${transport}`;
    const r = await curlIn(topo.ns.client, `http://${topo.addr.web}:${WEB_HTTP_PORT}${path}`, 5);
    assert.ok(r.ok, `the direct path works: ${r.err}`);
    assert.equal(web.httpSources(path), [topo.addr.client], 'without a tunnel the web host sees the client itself');
    assert.ok((await pingOk(topo.ns.client, topo.addr.web6, 1, 2)).ok, 'and IPv6 reaches it too');
    assert.ok((await leaks.packets()) > 0, 'the leak counter counts the direct traffic');
    await leaks.reset();
  });

  test(`${transport}: kill switch: with the server stopped, nothing from the client namespace reaches the web host`, async () => {
    assert.ok(serverBeforeKillSwitch, 'the control step failed');
    server = await startServer();
    ({ proc: client, up } = await startClient(true));
    assert.is(up.address, firstAddress, 'the same client gets the same address after the server restarted (persisted lease)');
    const tunnelled = await eventually(async () => (await pingOk(topo.ns.client, topo.addr.web, 1, 2)).ok, 20_000, 0);
    assert.ok(tunnelled, `with the kill switch on, the tunnel itself works; client output:\n${client.output()}`);
    assert.is(await leaks.packets(), 0, 'tunnelled traffic arrives from the server address, not counted as a leak');
    const ruleset = (await exec(topo.ns.client, 'nft', ['list', 'ruleset'])).stdout;
    assert.ok(ruleset.trim() !== '', 'the kill switch put nftables rules in the client namespace');

    const code = await server.stop();
    assert.is(code, 0, `the server exits 0 on SIGTERM; output:\n${server.output()}`);
    // Every way out: the routes (into the now dead tunnel), the real
    // interface forced with -I / --interface (which bypasses the routes),
    // TCP, UDP, ICMP, IPv4 and IPv6.
    const dev = topo.dev.client;
    const attempts: Array<[string, Promise<boolean>]> = [
      ['ping', pingOk(topo.ns.client, topo.addr.web, 2, 1).then((r) => r.ok)],
      [`ping -I ${dev}`, exec(topo.ns.client, 'ping', ['-n', '-c', '2', '-W', '1', '-I', dev, topo.addr.web], { allowFail: true }).then((r) => r.code === 0)],
      ['ping -6', pingOk(topo.ns.client, topo.addr.web6, 2, 1).then((r) => r.ok)],
      ['curl', curlIn(topo.ns.client, `http://${topo.addr.web}:${WEB_HTTP_PORT}/leak`, 3).then((r) => r.ok)],
      [
        `curl --interface ${dev}`,
        exec(topo.ns.client, 'curl', ['-sS', '--fail', '--noproxy', '*', '--max-time', '3', '--interface', dev, `http://${topo.addr.web}/leak-if`], { allowFail: true }).then(
          (r) => r.code === 0,
        ),
      ],
      ['curl -6', curlIn(topo.ns.client, `http://[${topo.addr.web6}]:${WEB_HTTP_PORT}/leak6`, 3).then((r) => r.ok)],
      ['dig (UDP)', digIn(topo.ns.client, DNS_TEST_NAME, topo.addr.web, 1, 2).then((r) => r.answer === DNS_TEST_ANSWER)],
    ];
    const results = await Promise.all(attempts.map(async ([what, p]) => [what, await p] as const));
    const got = results.filter(([, ok]) => ok).map(([what]) => what);
    assert.equal(got, [], `reached the web host with the server down: ${got.join(', ')}`);
    assert.is(await leaks.packets(), 0, 'no packet from the client side arrived in the web namespace');
    assert.ok(client.running(), `the client keeps running (reconnecting) with the server down; output:\n${client.output()}`);
  });

  test(`${transport}: the kill-switch client exits cleanly; then the plain route works again`, async () => {
    // If the previous test failed before stopping the server, stop it now so
    // this test's checks are about the client.
    if (server?.running()) await server.stop();
    needClient();
    const code = await client!.stop();
    assert.is(code, 0, `the client exits 0 on SIGTERM; output:\n${client!.output()}`);
    const diff = await waitRestored(topo.ns.client, clientBefore);
    assert.is(diff, '', `the client namespace differs from before the client started:\n${diff}`);
    const serverDiff = await waitRestored(topo.ns.server, serverBeforeKillSwitch!);
    assert.is(serverDiff, '', `the server namespace differs from before the second server started:\n${serverDiff}`);
    // The counter would have seen a leak: the same path counts once the kill switch is gone.
    assert.ok((await pingOk(topo.ns.client, topo.addr.web, 1, 2)).ok, 'the plain route works again');
    assert.ok((await leaks.packets()) > 0, 'the leak counter counts the direct traffic');
    await exec(topo.ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=0', 'net.ipv6.conf.all.forwarding=0']);
  });

  test(`${transport}: the host's /etc/resolv.conf is unchanged`, () => {
    assert.is(hostResolvFingerprint(), hostResolvBefore);
  });
}
