/**
 * core/gc-tuning.ts: after tuneGarbageCollector() V8 no longer starts
 * incremental marking (its major GCs are atomic), and an explicit
 * --incremental-marking on node's command line wins over it.
 *
 * Each case runs test/fixtures/gc-churn.ts in its own node with --trace-gc
 * and reads V8's trace: a major GC that followed incremental marking reports
 * the time "since start of marking".
 *
 *   npx tsx test/gc-tuning.test.ts
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { tuneGarbageCollector } from '../core/gc-tuning.ts';
import { runFixture } from './helpers/fixture.ts';

interface Trace {
  tuned: boolean;
  majors: number;
  incremental: number;
}

async function churn(nodeFlags: string[], arg: 'tuned' | 'untuned'): Promise<Trace> {
  const stdout = await runFixture('gc-churn.ts', [arg], ['--trace-gc', ...nodeFlags]);
  const lines = stdout.split('\n');
  const result = lines.map((l) => l.trim()).filter((l) => l.startsWith('{'));
  if (result.length !== 1) throw new Error(`no result line in:\n${stdout}`);
  const majors = lines.filter((l) => l.includes('Mark-Compact'));
  return {
    tuned: (JSON.parse(result[0]!) as { tuned: boolean }).tuned,
    majors: majors.length,
    incremental: majors.filter((l) => l.includes('since start of marking')).length,
  };
}

test('V8 collects the old generation with incremental marking by default (the case the tuning changes)', async () => {
  const t = await churn([], 'untuned');
  assert.ok(t.majors >= 1, 'the fixture makes V8 collect its old generation');
  assert.ok(t.incremental >= 1, `without tuning, major GCs follow incremental marking (${t.incremental} of ${t.majors})`);
});

test('after tuneGarbageCollector() every major GC is atomic: no incremental marking starts', async () => {
  const t = await churn([], 'tuned');
  assert.is(t.tuned, true);
  assert.ok(t.majors >= 1, 'the fixture still makes V8 collect its old generation');
  assert.is(t.incremental, 0);
});

test('an explicit --incremental-marking on the node command line wins', async () => {
  const t = await churn(['--incremental-marking'], 'tuned');
  assert.is(t.tuned, false);
  assert.ok(t.incremental >= 1);
});

test('the node flag is recognised in either spelling, on or off', () => {
  for (const flag of ['--incremental-marking', '--no-incremental-marking', '--incremental_marking', '--no-incremental_marking']) {
    assert.is(tuneGarbageCollector([flag]), false, flag);
  }
});

test.run();
