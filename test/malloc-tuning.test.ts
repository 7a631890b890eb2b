/**
 * core/malloc-tuning.ts: after tuneMalloc() glibc keeps freed memory at the
 * top of its heap instead of giving it back to the OS at once, so churning
 * 64 KiB blocks (what forwarded traffic does to Node's Buffer memory) stops
 * costing a page fault per 4 KiB.
 *
 * Each case runs test/fixtures/malloc-churn.ts in its own node, which calls
 * malloc/free through koffi and counts its own minor page faults.
 *
 *   npx tsx test/malloc-tuning.test.ts
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { runFixture } from './helpers/fixture.ts';

interface Churn {
  tuned: boolean;
  faults: number;
  rounds: number;
  pagesPerRound: number;
}

async function churn(arg: 'tuned' | 'default'): Promise<Churn> {
  const stdout = await runFixture('malloc-churn.ts', [arg]);
  const m = /^RESULT (.*)$/m.exec(stdout);
  if (!m) throw new Error(`no result line in:\n${stdout}`);
  return JSON.parse(m[1]!) as Churn;
}

test("glibc's defaults fault the churned memory in again every round (the case the tuning changes)", async () => {
  const c = await churn('default');
  assert.is(c.tuned, false);
  const pages = c.rounds * c.pagesPerRound;
  assert.ok(c.faults > pages / 2, `${c.faults} page faults over ${c.rounds} rounds of ${c.pagesPerRound} pages`);
});

test('after tuneMalloc() the same churn reuses its memory: fewer faults than one round has pages', async () => {
  const c = await churn('tuned');
  assert.is(c.tuned, true, 'tuneMalloc() reports the thresholds set (glibc on Linux)');
  assert.ok(c.faults < c.pagesPerRound / 4, `${c.faults} page faults over ${c.rounds} rounds of ${c.pagesPerRound} pages`);
});

test.run();
