/**
 * core/cidr.ts: address parsing, CIDR containment and the default egress policy.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  DEFAULT_EGRESS_DENY,
  EgressPolicy,
  cidrContains,
  formatIp,
  ipFromBytes,
  ipToBytes,
  parseCidr,
  parseIp,
} from '../core/cidr.ts';
import { DshieldError, ErrorCodes } from '../core/errors.ts';

test('parseIp: IPv4, IPv6, compressed forms, embedded IPv4, brackets and zones', () => {
  assert.equal(parseIp('1.2.3.4'), { family: 4, words: [0x01020304] });
  assert.equal(parseIp('255.255.255.255'), { family: 4, words: [0xffffffff] });
  assert.equal(parseIp('::'), { family: 6, words: [0, 0, 0, 0] });
  assert.equal(parseIp('::1'), { family: 6, words: [0, 0, 0, 1] });
  assert.equal(parseIp('1::'), { family: 6, words: [0x00010000, 0, 0, 0] });
  assert.equal(parseIp('2001:db8::8:800:200c:417a'), { family: 6, words: [0x20010db8, 0, 0x00080800, 0x200c417a] });
  assert.equal(parseIp('2001:DB8:0:0:8:800:200C:417A'), parseIp('2001:db8::8:800:200c:417a'));
  assert.equal(parseIp('::ffff:127.0.0.1'), { family: 6, words: [0, 0, 0xffff, 0x7f000001] });
  assert.equal(parseIp('1:2:3:4:5:6:7.8.9.10'), { family: 6, words: [0x00010002, 0x00030004, 0x00050006, 0x0708090a] });
  assert.equal(parseIp('[::1]'), { family: 6, words: [0, 0, 0, 1] });
  assert.equal(parseIp('fe80::1%eth0'), { family: 6, words: [0xfe800000, 0, 0, 1] });
});

test('parseIp: refuses what is not an address', () => {
  for (const bad of [
    '',
    'localhost',
    'example.com',
    '1.2.3',
    '1.2.3.4.5',
    '256.1.1.1',
    '1.2.3.4 ',
    '01.2.3.4', // leading zero: octal to some resolvers
    '1..2.3',
    '1.2.3.',
    '[1.2.3.4]',
    ':',
    ':::',
    '1:::2',
    '1::2::3',
    ':1:2:3:4:5:6:7',
    '1:2:3:4:5:6:7',
    '1:2:3:4:5:6:7:8:9',
    '1:2:3:4:5:6:7:8::',
    '12345::',
    'g::1',
    '1:',
    '::ffff:1.2.3',
    '::1.2.3.4:5',
    '[::1',
  ]) {
    assert.is(parseIp(bad), null, bad);
  }
});

test('formatIp is canonical (RFC 5952) and round-trips through bytes', () => {
  const cases: [string, string][] = [
    ['1.2.3.4', '1.2.3.4'],
    ['0:0:0:0:0:0:0:1', '::1'],
    ['2001:db8:0:0:1:0:0:1', '2001:db8::1:0:0:1'],
    ['2001:0db8:0000:0001:0000:0000:0000:0001', '2001:db8:0:1::1'],
    ['1:0:2:3:4:5:6:7', '1:0:2:3:4:5:6:7'],
    ['::', '::'],
    ['fe80::', 'fe80::'],
    ['::ffff:7f00:1', '::ffff:127.0.0.1'],
    ['::FFFF:10.0.0.1', '::ffff:10.0.0.1'],
  ];
  for (const [input, expected] of cases) {
    const ip = parseIp(input)!;
    assert.is(formatIp(ip), expected, input);
    assert.equal(ipFromBytes(ipToBytes(ip)), ip, `bytes round trip ${input}`);
  }
  assert.is(ipToBytes(parseIp('::1')!).length, 16);
  assert.equal([...ipToBytes(parseIp('10.0.0.1')!)], [10, 0, 0, 1]);
});

test('parseCidr and cidrContains: IPv4', () => {
  const net = parseCidr('10.1.2.3/8');
  assert.is(net.prefix, 8);
  assert.equal(net.words, [0x0a000000], 'host bits cleared');
  assert.ok(cidrContains(net, '10.0.0.0'));
  assert.ok(cidrContains(net, '10.255.255.255'));
  assert.not.ok(cidrContains(net, '11.0.0.0'));
  assert.not.ok(cidrContains(net, '9.255.255.255'));
  const odd = parseCidr('172.16.0.0/12');
  assert.ok(cidrContains(odd, '172.31.255.255'));
  assert.not.ok(cidrContains(odd, '172.32.0.0'));
  assert.not.ok(cidrContains(odd, '172.15.255.255'));
  assert.ok(cidrContains(parseCidr('0.0.0.0/0'), '203.0.113.9'));
  const single = parseCidr('192.0.2.7');
  assert.is(single.prefix, 32);
  assert.ok(cidrContains(single, '192.0.2.7'));
  assert.not.ok(cidrContains(single, '192.0.2.8'));
  assert.not.ok(cidrContains(net, 'not an ip'));
  assert.not.ok(cidrContains(net, '::ffff:10.0.0.1'), 'families are strict in cidrContains');
});

test('parseCidr and cidrContains: IPv6', () => {
  const ula = parseCidr('fc00::/7');
  assert.ok(cidrContains(ula, 'fc00::1'));
  assert.ok(cidrContains(ula, 'fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff'));
  assert.not.ok(cidrContains(ula, 'fe00::'));
  assert.not.ok(cidrContains(ula, '10.0.0.1'));
  const deep = parseCidr('2001:db8:aaaa:bbbb::/66');
  assert.ok(cidrContains(deep, '2001:db8:aaaa:bbbb:3fff::1'));
  assert.not.ok(cidrContains(deep, '2001:db8:aaaa:bbbb:4000::1'));
  const all = parseCidr('::/0');
  assert.ok(cidrContains(all, '2001:db8::1'));
  const single = parseCidr('::1');
  assert.is(single.prefix, 128);
  assert.ok(cidrContains(single, '::1'));
  assert.not.ok(cidrContains(single, '::2'));
  const w96 = parseCidr('64:ff9b::/96');
  assert.ok(cidrContains(w96, '64:ff9b::8.8.8.8'));
  assert.not.ok(cidrContains(w96, '64:ff9b:0:0:0:1::'));
});

test('parseCidr: bad input is a CONFIG error that names the input', () => {
  for (const bad of ['', '10.0.0.0/33', '::/129', '10.0.0.0/', '10.0.0.0/x', '10.0.0/8', 'example.com/8', '10.0.0.0/8/8', '/8', '10.0.0.0/-1']) {
    try {
      parseCidr(bad);
      assert.unreachable(`"${bad}" should not parse`);
    } catch (err) {
      assert.instance(err, DshieldError, bad);
      assert.is((err as DshieldError).code, ErrorCodes.CONFIG, bad);
      assert.ok((err as Error).message.includes(`"${bad}"`), `message names the input: ${(err as Error).message}`);
    }
  }
});

test('every DEFAULT_EGRESS_DENY entry parses', () => {
  for (const entry of DEFAULT_EGRESS_DENY) parseCidr(entry);
  assert.ok(DEFAULT_EGRESS_DENY.length >= 15);
});

test('default policy denies every category (DESIGN.md §6)', () => {
  const policy = new EgressPolicy([]);
  const denied: Record<string, string[]> = {
    'loopback': ['127.0.0.1', '127.255.255.254', '::1'],
    'private': ['10.0.0.1', '10.255.255.255', '172.16.0.1', '172.31.255.255', '192.168.0.1', '192.168.255.255', 'fc00::1', 'fd12:3456::1'],
    'link-local': ['169.254.0.1', '169.254.255.255', 'fe80::1', 'febf::1'],
    'cgnat': ['100.64.0.1', '100.127.255.255'],
    'multicast': ['224.0.0.1', '239.255.255.250', 'ff02::1', 'ff0e::1'],
    'cloud metadata': ['169.254.169.254', 'fd00:ec2::254'],
    'this network': ['0.0.0.0', '0.1.2.3'],
    'reserved': ['240.0.0.1', '250.1.2.3'],
    'broadcast': ['255.255.255.255'],
    'unspecified v6': ['::'],
    'site-local v6': ['fec0::1'],
    'mapped IPv4': ['::ffff:127.0.0.1', '::ffff:10.1.2.3', '::ffff:169.254.169.254', '::ffff:7f00:1'],
    'NAT64': ['64:ff9b::127.0.0.1', '64:ff9b::a9fe:a9fe', '64:ff9b::192.168.1.1'],
    'local NAT64': ['64:ff9b:1::1'],
    'not an address': ['localhost', 'example.com', '', '010.0.0.1'],
  };
  for (const [category, list] of Object.entries(denied)) {
    for (const ip of list) assert.not.ok(policy.check(ip), `${category}: ${ip} must be denied`);
  }
  const allowed = ['1.1.1.1', '8.8.8.8', '100.63.255.255', '100.128.0.0', '172.15.255.255', '172.32.0.0', '192.167.255.255', '223.255.255.255',
    '169.253.255.255', '2001:4860:4860::8888', '2606:4700::1111', '::ffff:8.8.8.8', '64:ff9b::8.8.8.8', '::2', 'fe00::1', 'fbff::1'];
  for (const ip of allowed) assert.ok(policy.check(ip), `${ip} must be allowed`);
});

test('allow list exempts ranges from the deny list, and mapped addresses follow their IPv4', () => {
  const policy = new EgressPolicy(['127.0.0.0/8', '10.1.0.0/16', 'fd00::/8', '::1']);
  assert.ok(policy.check('127.0.0.1'));
  assert.ok(policy.check('::ffff:127.0.0.1'), 'mapped loopback is allowed with 127/8');
  assert.ok(policy.check('64:ff9b::127.0.0.1'), 'NAT64 loopback is allowed with 127/8');
  assert.ok(policy.check('10.1.2.3'));
  assert.not.ok(policy.check('10.2.0.1'), 'outside the allowed /16');
  assert.not.ok(policy.check('::ffff:10.2.0.1'));
  assert.ok(policy.check('fd00:ec2::254'), 'inside the allowed fd00::/8');
  assert.not.ok(policy.check('fc00::1'));
  assert.ok(policy.check('::1'));
  assert.not.ok(policy.check('169.254.169.254'));
  // An IPv6 allow entry does not open an IPv4 range and vice versa.
  const v6only = new EgressPolicy(['::ffff:0:0/96']);
  assert.not.ok(v6only.check('::ffff:127.0.0.1'));
});

test('EgressPolicy: a bad allow entry is a CONFIG error naming the entry', () => {
  try {
    new EgressPolicy(['10.0.0.0/8', 'nonsense/8']);
    assert.unreachable();
  } catch (err) {
    assert.instance(err, DshieldError);
    assert.is((err as DshieldError).code, ErrorCodes.CONFIG);
    assert.match((err as Error).message, /egress allow list/);
    assert.match((err as Error).message, /"nonsense\/8"/);
  }
});

test('EgressPolicy.check is fast enough for a per-datagram check', () => {
  const policy = new EgressPolicy(['127.0.0.0/8']);
  const ips = ['8.8.8.8', '10.0.0.1', '2001:db8::1', '::ffff:192.168.1.1'];
  const n = 200_000;
  const started = process.hrtime.bigint();
  let allowed = 0;
  for (let k = 0; k < n; k++) if (policy.check(ips[k & 3]!)) allowed++;
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  assert.is(allowed, n / 2);
  // ~1 µs per check on a slow shared machine is still far below a datagram's cost.
  assert.ok(ms < 2_000, `${n} checks took ${ms.toFixed(0)} ms`);
});

test.run();
