/**
 * ViewOf keeps one view of a buffer from an offset and makes it again only
 * when asked for another buffer or offset: the packet thread hands the same
 * view to the kernel and to libsodium for every lone packet.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { ViewOf } from '../core/view-of.ts';

test('the same buffer from the same offset gives the same view, spanning to the end of the buffer', () => {
  const views = new ViewOf();
  const buf = Buffer.from('0123456789');
  const a = views.from(buf, 3);
  assert.is(a.toString(), '3456789');
  assert.is(views.from(buf, 3), a, 'no new view');
  buf[3] = 0x41;
  assert.is(a[0], 0x41, 'a view of the buffer, not a copy');
});

test('another offset or another buffer gives a new view of it', () => {
  const views = new ViewOf();
  const buf = Buffer.from('0123456789');
  const other = Buffer.from('abcdefghij');
  const a = views.from(buf, 3);
  assert.is(Buffer.from(views.from(buf, 5)).toString(), '56789');
  assert.is(Buffer.from(views.from(other, 5)).toString(), 'fghij');
  const back = views.from(buf, 3);
  assert.is.not(back, a, 'made again: only the last one is kept');
  assert.is(Buffer.from(back).toString(), '3456789');
  assert.is(views.from(buf, 10).length, 0, 'from the end: empty');
});

test.run();
