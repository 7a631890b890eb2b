/**
 * core/tun/leases.ts: the server's TUN address pool. Distinct addresses per
 * client, the same one again for the same name (also after a restart, read
 * back from the leases file), a full pool refuses, a gone client's lease can
 * be taken over, and the file is written atomically with mode 0600.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LeasePool } from '../core/tun/leases.ts';
import { ErrorCodes, isDshieldError } from '../core/errors.ts';

const dirs: string[] = [];
function leasesFile(): string {
  const dir = mkdtempSync(join(tmpdir(), 'dshield-leases-'));
  dirs.push(dir);
  return join(dir, 'keys', 'leases.json');
}

test.after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

test('distinct addresses for distinct clients; the server keeps .1', () => {
  const pool = new LeasePool({ subnet: '10.66.0.0/24', file: leasesFile() });
  assert.is(pool.serverAddress, '10.66.0.1/24');
  const a = pool.lease('alice');
  const b = pool.lease('bob');
  assert.is(a.address, '10.66.0.2/24');
  assert.is(b.address, '10.66.0.3/24');
  assert.is(a.ip, '10.66.0.2');
  assert.is(pool.lease('alice').address, a.address, 'same name, same address');
  assert.is(pool.size, 2);
});

test('stable across a restart: the leases file is read back', () => {
  const file = leasesFile();
  const first = new LeasePool({ subnet: '10.66.0.0/24', file });
  first.lease('alice');
  first.lease('bob');
  first.lease('carol');
  const again = new LeasePool({ subnet: '10.66.0.0/24', file });
  // Asked in another order, each gets its old address back.
  assert.is(again.lease('carol').ip, '10.66.0.4');
  assert.is(again.lease('alice').ip, '10.66.0.2');
  assert.is(again.lease('dave').ip, '10.66.0.5', 'a new client gets a free address');
  assert.is(again.lease('bob').ip, '10.66.0.3');
  const saved = JSON.parse(readFileSync(file, 'utf8')) as { leases: Record<string, string> };
  assert.equal(saved.leases, { alice: '10.66.0.2', bob: '10.66.0.3', carol: '10.66.0.4', dave: '10.66.0.5' });
});

test('the file is 0600 and written atomically (no temporary left)', () => {
  const file = leasesFile();
  new LeasePool({ subnet: '10.66.0.0/24', file }).lease('alice');
  assert.is(statSync(file).mode & 0o777, 0o600);
  const left = readdirSync(join(file, '..'));
  assert.equal(left, ['leases.json']);
});

test('a full pool refuses; only a lease whose owner is gone is taken over', () => {
  const pool = new LeasePool({ subnet: '10.66.0.0/30', file: leasesFile() });
  assert.is(pool.lease('alice').ip, '10.66.0.2');
  const refused = (fn: () => unknown): unknown => {
    try {
      fn();
    } catch (e) {
      return e;
    }
    return undefined;
  };
  const err = refused(() => pool.lease('bob'));
  assert.ok(isDshieldError(err, ErrorCodes.TUN), String(err));
  assert.match((err as Error).message, /pool 10\.66\.0\.0\/30 is full/);
  assert.ok(isDshieldError(refused(() => pool.lease('bob', () => false)), ErrorCodes.TUN), 'alice is not gone: still refused');
  assert.is(pool.lease('bob', (name) => name === 'alice').ip, '10.66.0.2', 'alice is gone: bob takes her address');
  assert.is(pool.find('alice'), undefined);
});

test('IPv6: the same host number in subnet6', () => {
  const pool = new LeasePool({ subnet: '10.66.0.0/24', subnet6: 'fd66::/64', file: leasesFile() });
  assert.is(pool.serverAddress6, 'fd66::1/64');
  pool.lease('alice');
  const b = pool.lease('bob');
  assert.is(b.address6, 'fd66::3/64');
  const v6 = Buffer.from('fd660000000000000000000000000003', 'hex');
  assert.is(pool.hostOf6(v6, 0), 3);
  assert.is(pool.hostOf6(Buffer.from('fd670000000000000000000000000003', 'hex'), 0), -1, 'outside the pool');
  assert.is(pool.hostOf6(Buffer.from('fd660000000000000000000000010003', 'hex'), 0), -1, 'host bits beyond the IPv4 pool');
});

test('hostOf4 maps pool addresses to host numbers and everything else to -1', () => {
  const pool = new LeasePool({ subnet: '10.66.0.0/24', file: leasesFile() });
  assert.is(pool.hostOf4(0x0a420007), 7);
  assert.is(pool.hostOf4(0x0a430007), -1);
  assert.is(pool.hostOf4(0x08080808), -1);
});

test('a changed subnet forgets leases outside it; a malformed file is one clear error', () => {
  const file = leasesFile();
  new LeasePool({ subnet: '10.66.0.0/24', file }).lease('alice');
  const moved = new LeasePool({ subnet: '10.77.0.0/24', file });
  assert.is(moved.lease('bob').ip, '10.77.0.2');
  assert.is(moved.lease('alice').ip, '10.77.0.3');

  writeFileSync(file, '{ not json');
  let err: unknown;
  try {
    new LeasePool({ subnet: '10.66.0.0/24', file });
  } catch (e) {
    err = e;
  }
  assert.ok(isDshieldError(err, ErrorCodes.TUN));
  assert.match((err as Error).message, /leasesFile: .* is not valid JSON/);
  assert.not.match((err as Error).message, /\n/);
});

test.run();
