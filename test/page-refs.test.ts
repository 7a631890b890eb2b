/**
 * The bench's page counting (bench/page-refs.ts, behind
 * bench/ping-footprint.ts): smaps text is grouped by kind of mapping, and
 * on this kernel clearing the accessed bits and touching memory again is
 * seen as that many KiB of anonymous memory, and not seen without the touch.
 */
import { readFileSync } from 'node:fs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { clearRefs, totalKib, touchedKib, touchedKibIn } from '../bench/page-refs.ts';

const SMAPS = `55d0c0a00000-55d0c0c00000 r-xp 00000000 08:01 1234   /usr/bin/node
Size:               2048 kB
Referenced:          300 kB
7f00aa000000-7f00aa040000 rw-p 00000000 00:00 0
Referenced:          148 kB
7f00ab000000-7f00ab03c000 rwxp 00000000 00:00 0
Referenced:           80 kB
7f00ac000000-7f00ac100000 rw-p 00000000 00:00 0    [heap]
Referenced:           24 kB
7f00ad000000-7f00ad200000 r-xp 00000000 08:01 99     /usr/lib/x86_64-linux-gnu/libc.so.6
Referenced:          110 kB
7f00ae000000-7f00ae001000 r-xp 00000000 00:00 0    [vdso]
Referenced:            4 kB
`;

test('smaps is grouped into the program, JIT code, anonymous memory and each library', () => {
  const kib = touchedKibIn(SMAPS, 'node');
  assert.equal(Object.fromEntries(kib), { program: 300, anonymous: 172, 'JIT code': 80, 'libc.so.6': 110, vdso: 4 });
  assert.is(totalKib(kib), 666);
  // Another program's name leaves node's file a library like any other.
  assert.is(touchedKibIn(SMAPS, 'openvpn').get('node'), 300);
});

test('by region, each anonymous mapping and JIT code keeps its own address range', () => {
  const kib = touchedKibIn(SMAPS, 'node', true);
  assert.is(kib.get('anonymous 7f00aa000000-7f00aa040000 rw-p'), 148);
  assert.is(kib.get('anonymous 7f00ac000000-7f00ac100000 rw-p [heap]'), 24);
  assert.is(kib.get('JIT code 7f00ab000000-7f00ab03c000 rwxp'), 80);
  assert.is(kib.get('anonymous'), undefined);
});

const linux = process.platform === 'linux';
test('memory touched after clearRefs is counted, and untouched memory is not', () => {
  if (!linux) return;
  const program = readFileSync('/proc/self/cmdline', 'utf8').split('\0')[0]!.split('/').pop()!;
  const pages = new Uint8Array(8 << 20);
  pages.fill(1); // every page exists before the count starts
  clearRefs(process.pid);
  const idle = touchedKib(process.pid, program).get('anonymous') ?? 0;
  clearRefs(process.pid);
  for (let at = 0; at < pages.length; at += 4096) pages[at] = 2;
  const touched = touchedKib(process.pid, program).get('anonymous') ?? 0;
  assert.ok(touched >= 8 * 1024, `touching 8 MiB counted only ${touched} KiB`);
  assert.ok(idle < 8 * 1024, `8 MiB counted as touched (${idle} KiB) with nothing touching it`);
});

test.run();
