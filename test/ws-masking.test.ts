/**
 * The ws transport masks every client frame (RFC 6455). ws, and the
 * transport itself for the frames it writes in place (core/ws-mask.ts), do
 * it in C when the optional addon bufferutil loads, in JavaScript at a fraction of the
 * speed when it does not (plugins/transport-ws.ts has the figures): a fresh
 * install on this platform must have the native one.
 */
import { createRequire } from 'node:module';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { nativeMasking } from '../core/ws-mask.ts';

const require = createRequire(import.meta.url);

interface Masker {
  mask(source: Buffer, mask: Buffer, output: Buffer, offset: number, length: number): void;
  unmask(buffer: Buffer, mask: Buffer): void;
}

test('bufferutil is installed and loads its native binary (not the JavaScript fallback)', () => {
  const native = require('bufferutil') as Masker;
  const fallback = require('bufferutil/fallback') as Masker;
  assert.is.not(native.mask, fallback.mask, 'bufferutil fell back to JavaScript');
});

test('the frames the ws transport masks itself (sendInPlace) are masked by the native one too', () => {
  assert.ok(nativeMasking, 'core/ws-mask.ts fell back to JavaScript');
});

test('it masks and unmasks as RFC 6455 says (XOR with the 4-byte key, repeated)', () => {
  const { mask, unmask } = require('bufferutil') as Masker;
  const key = Buffer.from([0x37, 0xfa, 0x21, 0x3d]);
  const data = Buffer.from(Array.from({ length: 1000 }, (_, i) => i & 0xff));
  const out = Buffer.alloc(data.length + 2);
  mask(data, key, out, 2, data.length);
  for (let i = 0; i < data.length; i++) assert.is(out[2 + i], data[i]! ^ key[i % 4]!, `byte ${i}`);
  const back = out.subarray(2);
  unmask(back, key);
  assert.ok(back.equals(data));
});

test.run();
