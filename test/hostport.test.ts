/**
 * core/hostport.ts: "host:port" in, "host:port" out, IPv6 in brackets, and a
 * clear DSHIELD_ERR_CONFIG naming the setting for anything else.
 *
 *   npx tsx test/hostport.test.ts
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { isDshieldError } from '../core/errors.ts';
import { formatHostPort, formatPeer, parseHostPort } from '../core/hostport.ts';

test('parses IPv4, names and bracketed IPv6 (with a zone)', () => {
  assert.equal(parseHostPort('127.0.0.1:8443', 'x'), { host: '127.0.0.1', port: 8443 });
  assert.equal(parseHostPort('example.com:443', 'x'), { host: 'example.com', port: 443 });
  assert.equal(parseHostPort('[::1]:0', 'x'), { host: '::1', port: 0 });
  assert.equal(parseHostPort('[fe80::1%eth0]:65535', 'x'), { host: 'fe80::1%eth0', port: 65535 });
  assert.equal(parseHostPort(' 0.0.0.0:80 ', 'x'), { host: '0.0.0.0', port: 80 });
});

test('refuses everything else with DSHIELD_ERR_CONFIG, naming the setting and the problem', () => {
  const cases: [string, string][] = [
    ['', 'empty'],
    ['127.0.0.1', 'no port'],
    ['::1:80', 'IPv6 address without brackets'],
    [':80', 'no host'],
    ['[::1]', 'port after'],
    ['[1.2.3.4]:5', 'IPv6 address in brackets'],
    ['h:65536', 'above 65535'],
    ['h:http', 'not a number'],
    ['h:-1', 'not a number'],
    ['a b:1', 'characters'],
    ['ws://h:1/p', 'is a URL'],
  ];
  for (const [input, why] of cases) {
    try {
      parseHostPort(input, 'server.listen');
      assert.unreachable(`${JSON.stringify(input)} was accepted`);
    } catch (err) {
      assert.ok(isDshieldError(err, 'DSHIELD_ERR_CONFIG'), `${JSON.stringify(input)}: ${String(err)}`);
      assert.match((err as Error).message, /^server\.listen: /);
      assert.match((err as Error).message, why);
    }
  }
});

test('formats with brackets for IPv6, and shows IPv4-mapped peers as IPv4', () => {
  assert.is(formatHostPort('::1', 80), '[::1]:80');
  assert.is(formatHostPort('10.0.0.1', 80), '10.0.0.1:80');
  assert.is(formatHostPort('example.com', 1), 'example.com:1');
  assert.is(formatPeer('::ffff:192.0.2.1', 5), '192.0.2.1:5');
  assert.is(formatPeer('2001:db8::1', 5), '[2001:db8::1]:5');
  assert.is(formatPeer(undefined, undefined), 'unknown:0');
  for (const s of ['1.2.3.4:5', '[::1]:6', 'h:7']) {
    const { host, port } = parseHostPort(s, 'x');
    assert.is(formatHostPort(host, port), s, 'round trip');
  }
});

test.run();
