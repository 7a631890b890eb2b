/**
 * The netns test topology (test/helpers/netns.ts): it builds, forwarding in
 * the server is off so client and web cannot talk until something turns it
 * on, and cleanup leaves no namespace, process or /etc/netns entry behind —
 * also when the process that built it dies of an uncaught error or SIGTERM.
 * Needs root; skips (exit 77) elsewhere.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  canRunNetns,
  createTopology,
  exec,
  run,
  skipUnlessNetns,
  spawnIn,
  stopChild,
  writeNetnsEtc,
  type Topology,
} from './helpers/netns.ts';
import { withTimeout } from './helpers/timeout.ts';

skipUnlessNetns(['ip', 'ping']);

const NETNS_HELPER = fileURLToPath(new URL('./helpers/netns.ts', import.meta.url));

async function namespaces(): Promise<string[]> {
  const { stdout } = await run('ip', ['netns', 'list']);
  return stdout
    .split('\n')
    .map((l) => l.split(' ')[0]!)
    .filter(Boolean);
}

async function pingOk(ns: string, to: string): Promise<boolean> {
  const r = await exec(ns, 'ping', ['-c', '1', '-W', '1', '-n', to], { allowFail: true, timeout: 5_000 });
  return r.code === 0;
}

let topo: Topology | undefined;

test.after(() => {
  topo?.cleanup();
});

test('canRunNetns names what is missing', () => {
  const why = canRunNetns(['ip', 'dshield-no-such-tool']);
  assert.ok(why?.includes('dshield-no-such-tool'), String(why));
  assert.is(canRunNetns(['ip']), undefined);
});

test('the topology builds: each host reaches its neighbour', async () => {
  topo = await withTimeout(createTopology(), 20_000, 'createTopology');
  const list = await namespaces();
  for (const ns of Object.values(topo.ns)) assert.ok(list.includes(ns), `${ns} exists`);
  assert.ok(topo.ns.client.startsWith(topo.id));
  const addrs = (await exec(topo.ns.client, 'ip', ['-br', 'addr', 'show', 'dev', topo.dev.client])).stdout;
  assert.ok(addrs.includes(`${topo.addr.client}/24`), addrs);
  assert.ok(await pingOk(topo.ns.client, topo.addr.serverClientSide), 'client -> server');
  assert.ok(await pingOk(topo.ns.web, topo.addr.serverWebSide), 'web -> server');
  const route = (await exec(topo.ns.client, 'ip', ['route', 'show', 'default'])).stdout;
  assert.ok(route.includes(`via ${topo.addr.serverClientSide}`), route);
});

test('without forwarding in the server, client and web cannot reach each other', async () => {
  const t = topo!;
  const fwd = (await exec(t.ns.server, 'sysctl', ['-n', 'net.ipv4.ip_forward'])).stdout.trim();
  assert.is(fwd, '0');
  assert.not.ok(await pingOk(t.ns.client, t.addr.web), 'client must not reach web');
  assert.not.ok(await pingOk(t.ns.client, t.addr.web6), 'client must not reach web over IPv6');
  // The host's own setting is not the namespace's: turning it on in the server
  // namespace is what opens the path (and proves the routes are right).
  await exec(t.ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=1']);
  try {
    assert.ok(await pingOk(t.ns.client, t.addr.web), 'client reaches web once the server forwards');
  } finally {
    await exec(t.ns.server, 'sysctl', ['-qw', 'net.ipv4.ip_forward=0']);
  }
  assert.not.ok(await pingOk(t.ns.client, t.addr.web), 'blocked again');
});

test('ip netns exec sees /etc/netns/<ns>/resolv.conf, not the host file', async () => {
  const t = topo!;
  writeNetnsEtc(t.ns.client, { 'resolv.conf': 'nameserver 10.200.1.1\n' });
  const inside = (await exec(t.ns.client, 'cat', ['/etc/resolv.conf'])).stdout;
  assert.is(inside, 'nameserver 10.200.1.1\n');
});

test('cleanup removes namespaces, their processes and /etc/netns entries', async () => {
  const t = topo!;
  const sleeper = spawnIn(t.ns.web, 'sleep', ['60']);
  await withTimeout(new Promise((r) => sleeper.once('spawn', r)), 5_000, 'sleep to start');
  const pid = sleeper.pid!;
  t.cleanup();
  topo = undefined;
  const list = await namespaces();
  assert.not.ok(list.some((n) => n.startsWith(t.id)), `left: ${list.join(' ')}`);
  assert.not.ok(existsSync(`/etc/netns/${t.ns.client}`));
  await withTimeout(new Promise((r) => (sleeper.exitCode !== null || sleeper.signalCode !== null ? r(null) : sleeper.once('exit', r))), 5_000, 'sleeper to die');
  let alive = true;
  try {
    process.kill(pid, 0);
  } catch {
    alive = false;
  }
  assert.not.ok(alive, 'the process started in the namespace is gone');
  await stopChild(sleeper); // no-op now
});

for (const how of ['uncaught error', 'SIGTERM'] as const) {
  test(`a process that dies of ${how} still removes its namespaces`, async () => {
    const code =
      `import { createTopology } from ${JSON.stringify(NETNS_HELPER)};` +
      `const t = await createTopology(); console.log('ID=' + t.id);` +
      (how === 'SIGTERM' ? 'setInterval(() => {}, 1000);' : `setTimeout(() => { throw new Error('boom'); }, 10);`);
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => {
      out += c.toString();
      if (how === 'SIGTERM' && out.includes('ID=')) child.kill('SIGTERM');
    });
    child.stderr.resume();
    const exit = await withTimeout(new Promise<number | null>((r) => child.once('exit', (c) => r(c))), 30_000, 'child to exit');
    const id = /ID=(\w+)/.exec(out)?.[1];
    assert.ok(id, `child printed its topology id: ${out}`);
    assert.is.not(exit, 0);
    const list = await namespaces();
    assert.not.ok(list.some((n) => n.startsWith(id!)), `left behind: ${list.join(' ')}`);
  });
}

test.run();
