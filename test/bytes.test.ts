/**
 * core/bytes.ts: big-endian numbers read by index agree with Buffer's own
 * readers at every offset, across the whole range (the top bit set too).
 */
import { randomBytes } from 'node:crypto';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { u16be, u32be } from '../core/bytes.ts';

test('u32be and u16be read what readUInt32BE and readUInt16BE read, at every offset', () => {
  for (let round = 0; round < 50; round++) {
    const b = randomBytes(23);
    for (let at = 0; at + 4 <= b.length; at++) assert.is(u32be(b, at), b.readUInt32BE(at), `u32be at ${at} of ${b.toString('hex')}`);
    for (let at = 0; at + 2 <= b.length; at++) assert.is(u16be(b, at), b.readUInt16BE(at), `u16be at ${at} of ${b.toString('hex')}`);
  }
});

test('the extremes: all ones is 2^32 - 1 (unsigned, not -1), the top bit alone 2^31', () => {
  const ones = Buffer.alloc(4, 0xff);
  assert.is(u32be(ones, 0), 0xffff_ffff);
  assert.is(u16be(ones, 1), 0xffff);
  assert.is(u32be(Buffer.from([0x80, 0, 0, 0]), 0), 0x8000_0000);
  assert.is(u32be(Buffer.from([0, 0, 0, 1]), 0), 1);
  assert.is(u32be(new Uint8Array([9, 0x12, 0x34, 0x56, 0x78]), 1), 0x1234_5678, 'a plain Uint8Array, at an offset');
});

test.run();
