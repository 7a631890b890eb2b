/**
 * core/roster.ts: add and remove in any order keep exactly the values still
 * in; a ticket removes once; and, the reason it exists, what was removed
 * dies in a scavenge instead of being promoted to the old generation, which
 * is what a Set does with the things that churn through it.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Roster, type RosterTicket } from '../core/roster.ts';
import { promotedByChurn } from './helpers/gc-churn.ts';

test('values() is what was added and not yet removed, whatever the order', () => {
  const roster = new Roster<number>();
  const tickets = new Map<number, RosterTicket<number>>();
  const expected = new Set<number>();
  // A fixed pseudo-random walk of adds and removes.
  let seed = 7;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
  for (let step = 0; step < 5000; step++) {
    const n = next() % 64;
    if (tickets.has(n)) {
      roster.remove(tickets.get(n)!);
      tickets.delete(n);
      expected.delete(n);
    } else {
      tickets.set(n, roster.add(n));
      expected.add(n);
    }
    if (step % 97 === 0) assert.equal(roster.values().sort((a, b) => a - b), [...expected].sort((a, b) => a - b), `step ${step}`);
  }
  assert.is(roster.size, expected.size);
});

test('a ticket removes its value once; a second remove() touches nothing else', () => {
  const roster = new Roster<string>();
  const a = roster.add('a');
  roster.add('b');
  const c = roster.add('c');
  roster.remove(a);
  roster.remove(a);
  assert.equal(roster.values().sort(), ['b', 'c']);
  assert.is(a.value, undefined, 'a removed ticket holds nothing');
  roster.remove(c);
  assert.equal(roster.values(), ['b']);
  assert.is(roster.size, 1);
});

test("another roster's ticket is ignored", () => {
  const one = new Roster<string>();
  const two = new Roster<string>();
  one.add('x');
  const y = two.add('y');
  one.remove(y);
  assert.equal(one.values(), ['x']);
  assert.equal(two.values(), ['y']);
});

test('values() is a copy: removing while going through it is safe', () => {
  const roster = new Roster<number>();
  const tickets = [1, 2, 3, 4].map((n) => roster.add(n));
  const seen: number[] = [];
  for (const v of roster.values()) {
    seen.push(v);
    roster.remove(tickets[v - 1]!);
  }
  assert.equal(seen.sort(), [1, 2, 3, 4]);
  assert.is(roster.size, 0);
});

test('what a roster let go of dies young; what a Set let go of is promoted (why Roster exists)', () => {
  const roster = new Roster<object>();
  const viaRoster = promotedByChurn({ add: (v) => roster.add(v), remove: (t) => roster.remove(t as RosterTicket<object>) });
  const set = new Set<object>();
  const viaSet = promotedByChurn({ add: (v) => set.add(v), remove: (_t, v) => set.delete(v) });
  // 1,000 values of ~8 KB went through each.
  assert.ok(viaRoster < 1_000_000, `the roster's old generation grew ${viaRoster} bytes`);
  assert.ok(viaSet > 4_000_000, `the control: a Set's grew only ${viaSet} bytes, so this test could not tell them apart`);
});

test.run();
