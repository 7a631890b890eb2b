/**
 * core/log.ts: records fan out to every sink, a throwing sink is skipped,
 * debug is skipped when no sink wants it, secret-named fields are redacted,
 * scopes nest, and the bootstrap logger writes warnings to its stream.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bootstrapLogger, createLogger, rescopeLogger } from '../core/log.ts';
import type { LogLevel, LogRecord, LoggerPlugin } from '../core/types.ts';

function capture(minLevel?: LogLevel): LoggerPlugin & { records: LogRecord[]; minLevel?: LogLevel } {
  const records: LogRecord[] = [];
  return { name: 'capture', records, minLevel, log: (r) => records.push(r) };
}

test('records reach every sink with time, level, scope, message and fields', () => {
  const a = capture();
  const b = capture();
  const log = createLogger([a, b], 'server');
  const before = Date.now();
  log.info('hello', { n: 1 });
  assert.is(a.records.length, 1);
  assert.is(b.records.length, 1);
  const r = a.records[0]!;
  assert.is(r.level, 'info');
  assert.is(r.scope, 'server');
  assert.is(r.msg, 'hello');
  assert.equal(r.fields, { n: 1 });
  assert.ok(r.time >= before && r.time <= Date.now());
});

test('a sink that throws is skipped and the others still get the record', () => {
  const good = capture();
  const bad: LoggerPlugin = {
    name: 'bad',
    log() {
      throw new Error('disk full');
    },
  };
  const log = createLogger([bad, good], 'core');
  log.error('still logged');
  assert.is(good.records.length, 1);
});

test('debug is not even built when no sink wants it; a sink without minLevel gets everything', () => {
  const infoOnly = capture('info');
  const log = createLogger([infoOnly], 'core');
  let built = 0;
  const fields = {
    get expensive() {
      built++;
      return 1;
    },
  };
  log.debug('skipped', fields);
  assert.is(infoOnly.records.length, 0);
  assert.is(built, 0, 'fields of a dropped record are never read');

  const all = capture();
  const sinks: LoggerPlugin[] = [infoOnly];
  const late = createLogger(sinks, 'core');
  sinks.push(all); // logger plugins load after the core's logger exists
  late.debug('kept');
  assert.is(all.records.length, 1);
  assert.is(infoOnly.records.length, 1, 'each sink filters for itself; the core passes it on');

  const floor = createLogger([all], 'core', 'warn');
  floor.info('below the floor');
  assert.is(all.records.length, 1);
});

test('secret-named fields are redacted before any sink sees them', () => {
  const sink = capture();
  const fields = { privateKey: 'AAAA', psk: 'BBBB', publicKey: 'CCCC', n: 1 };
  createLogger([sink], 'core').info('keys', fields);
  assert.equal(sink.records[0]!.fields, { privateKey: '<redacted>', psk: '<redacted>', publicKey: 'CCCC', n: 1 });
  assert.is(fields.privateKey, 'AAAA', "the caller's object is not changed");
});

test('child scopes nest; rescopeLogger sets an exact scope on the same sinks', () => {
  const sink = capture();
  const root = createLogger([sink], 'server');
  root.child('session').warn('a');
  createLogger([sink], '').child('client').warn('b');
  rescopeLogger(root, 'transport:ws').warn('c');
  assert.equal(sink.records.map((r) => r.scope), ['server:session', 'client', 'transport:ws']);
});

test('bootstrapLogger writes warnings and errors as one line each, and drops the rest', () => {
  const lines: string[] = [];
  const log = bootstrapLogger('dshield', { write: (l) => lines.push(l) });
  log.info('quiet');
  log.debug('quiet');
  log.warn('careful', { file: 'x' });
  log.child('config').error('broken');
  assert.equal(lines, ['warn  dshield: careful file=x', 'error dshield:config: broken']);
});

test.run();
