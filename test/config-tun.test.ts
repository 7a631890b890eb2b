/**
 * core/config.ts: client.tun and server.tun. Off by default; true means the
 * defaults; an object is checked field by field; the environment and --set
 * switch them on whole or set one field, like every other key.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig, type LoadConfigOptions } from '../core/config.ts';
import { ErrorCodes, isDshieldError } from '../core/errors.ts';
import type { ClientTunConfig, ServerTunConfig } from '../core/types.ts';
import { tempDir } from './helpers/cli.ts';

const dirs: Array<{ cleanup(): void }> = [];
test.after(() => dirs.forEach((d) => d.cleanup()));

function load(config: unknown, opts: Partial<LoadConfigOptions> = {}) {
  const d = tempDir('dshield-cfgtun-');
  dirs.push(d);
  if (config !== undefined) writeFileSync(join(d.dir, 'dshield.config.json'), JSON.stringify(config));
  return loadConfig({ cwd: d.dir, env: {}, materializeKeys: false, ...opts }).then((c) => ({ c, dir: d.dir }));
}

async function fails(config: unknown, opts: Partial<LoadConfigOptions>, re: RegExp): Promise<void> {
  try {
    await load(config, opts);
  } catch (err) {
    assert.ok(isDshieldError(err, ErrorCodes.CONFIG), String(err));
    assert.match((err as Error).message, re);
    return;
  }
  assert.unreachable(`expected ${re}`);
}

test('off by default', async () => {
  const { c } = await load(undefined);
  assert.is(c.client.tun, false);
  assert.is(c.server.tun, false);
});

test('true means the defaults; paths resolve against the config directory', async () => {
  const { c, dir } = await load({ client: { tun: true }, server: { tun: true } });
  assert.equal(c.client.tun, {
    name: 'dshield%d',
    routes: null,
    exclude: [],
    dns: true,
    killSwitch: false,
    queues: 1,
    stateDir: '/var/lib/dshield',
    resolvConf: '/etc/resolv.conf',
  } satisfies ClientTunConfig);
  assert.equal(c.server.tun, {
    subnet: '10.66.0.0/24',
    subnet6: '',
    nat: true,
    dns: ['1.1.1.1'],
    clientToClient: false,
    name: 'dshield%d',
    leasesFile: join(dir, 'keys/leases.json'),
    mtu: 1420,
    stateDir: '/var/lib/dshield',
  } satisfies ServerTunConfig);
});

test('an object is checked and completed', async () => {
  const { c, dir } = await load({
    client: { tun: { routes: ['10.0.0.0/8'], exclude: ['192.168.1.0/24'], killSwitch: true, dns: false, stateDir: 'state' } },
    server: { tun: { subnet: '10.77.0.0/16', subnet6: 'fd77::/64', dns: '9.9.9.9, 1.1.1.1', clientToClient: true, mtu: 1380 } },
  });
  const ct = c.client.tun as ClientTunConfig;
  assert.equal(ct.routes, ['10.0.0.0/8']);
  assert.equal(ct.exclude, ['192.168.1.0/24']);
  assert.is(ct.killSwitch, true);
  assert.is(ct.dns, false);
  assert.is(ct.stateDir, join(dir, 'state'));
  const st = c.server.tun as ServerTunConfig;
  assert.is(st.subnet6, 'fd77::/64');
  assert.equal(st.dns, ['9.9.9.9', '1.1.1.1']);
  assert.is(st.clientToClient, true);
  assert.is(st.mtu, 1380);
});

test('--set and the environment, whole or one field', async () => {
  let { c } = await load(undefined, { sets: ['client.tun=true', 'server.tun={"subnet":"10.77.0.0/24"}'] });
  assert.is((c.client.tun as ClientTunConfig).dns, true);
  assert.is((c.server.tun as ServerTunConfig).subnet, '10.77.0.0/24');
  ({ c } = await load(undefined, { env: { DSHIELD_CLIENT__TUN__KILLSWITCH: 'true', DSHIELD_SERVER__TUN: 'true' } }));
  assert.is((c.client.tun as ClientTunConfig).killSwitch, true, 'one field switches TUN on with defaults for the rest');
  assert.is((c.server.tun as ServerTunConfig).nat, true);
  ({ c } = await load({ client: { tun: { killSwitch: true } } }, { sets: ['client.tun.name=vpn0', 'client.tun=false'] }));
  assert.is(c.client.tun, false, 'the last layer wins');
  ({ c } = await load({ client: { tun: { killSwitch: true } } }, { sets: ['client.tun.routes=10.0.0.0/8,172.16.0.0/12'] }));
  assert.equal((c.client.tun as ClientTunConfig).routes, ['10.0.0.0/8', '172.16.0.0/12']);
  assert.is((c.client.tun as ClientTunConfig).killSwitch, true, 'other fields kept');
});

test('mistakes are one line naming the setting', async () => {
  await fails({ client: { tun: { killswitch: true } } }, {}, /client\.tun: unknown setting "killswitch" \(did you mean "killSwitch"\?\)/);
  await fails({ client: { tun: { routes: ['10.0.0.0/33'] } } }, {}, /client\.tun\.routes\[0\]: invalid address range/);
  await fails({ client: { tun: 'yes' } }, {}, /client\.tun: expected true, false or/);
  await fails({ client: { tun: { name: 'much-too-long-name0' } } }, {}, /client\.tun\.name: expected an interface name/);
  await fails({ server: { tun: { subnet: '10.66.0.0/31' } } }, {}, /server\.tun\.subnet: expected an IPv4 range from \/8 to \/30/);
  await fails({ server: { tun: { subnet6: 'fd66::/124' } } }, {}, /server\.tun\.subnet6: expected an IPv6 range/);
  await fails({ server: { tun: { dns: ['one.one.one.one'] } } }, {}, /server\.tun\.dns\[0\]: expected an IP address/);
  await fails(undefined, { sets: ['server.tun.subnett=10.0.0.0/24'] }, /server\.tun has no setting "subnett" \(did you mean "subnet"\?\)/);
});

test.run();
