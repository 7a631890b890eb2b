/**
 * The memory a process touched since a moment, by the kernel's accessed
 * bits (Linux): clearRefs(pid) clears them (/proc/PID/clear_refs), and
 * touchedKib(pid) reads back, from /proc/PID/smaps, how many KiB of each
 * kind of mapping have been referenced since. Page granularity (4 KiB, or
 * a whole huge page): it counts pages touched, not cache lines.
 *
 * Used by bench/ping-footprint.ts, where a VM has no hardware cache
 * counters to say what a packet's work costs on a CPU back from idle.
 * Writing another process's clear_refs needs the rights to ptrace it (root
 * for the bench's processes).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { basename } from 'node:path';

/**
 * KiB referenced per kind of mapping in `smaps` (the text of
 * /proc/PID/smaps): 'program' (the file named `program`, the executable),
 * 'JIT code' (anonymous and executable), 'anonymous' (heaps, stacks and
 * other memory no file backs), 'vdso', and each other file by its base name.
 * With `byRegion`, anonymous mappings and JIT code are keyed each by its own
 * address range as well ("anonymous 7f…-7f… rw-p").
 */
export function touchedKibIn(smaps: string, program: string, byRegion = false): Map<string, number> {
  const kib = new Map<string, number>();
  let kind = '';
  for (const line of smaps.split('\n')) {
    const mapping = /^([0-9a-f]+-[0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (mapping !== null) {
      const [, range, perms, path] = mapping;
      if (path === '[vdso]' || path === '[vvar]') kind = 'vdso';
      else if (path === '' || path!.startsWith('[')) {
        kind = path === '' && perms!.includes('x') ? 'JIT code' : 'anonymous';
        if (byRegion) kind = `${kind} ${range} ${perms}${path === '' ? '' : ` ${path}`}`;
      } else kind = basename(path!) === program ? 'program' : basename(path!);
      continue;
    }
    const referenced = /^Referenced:\s+(\d+) kB/.exec(line);
    if (referenced !== null) kib.set(kind, (kib.get(kind) ?? 0) + Number(referenced[1]));
  }
  return kib;
}

/** Clear the accessed bits of every page `pid` maps: what it touches from now on is counted. */
export function clearRefs(pid: number): void {
  writeFileSync(`/proc/${pid}/clear_refs`, '1');
}

/** What `pid` touched since clearRefs(pid), by kind of mapping (touchedKibIn). */
export function touchedKib(pid: number, program: string, byRegion = false): Map<string, number> {
  return touchedKibIn(readFileSync(`/proc/${pid}/smaps`, 'utf8'), program, byRegion);
}

/** The total of a touchedKib result. */
export function totalKib(touched: Map<string, number>): number {
  let sum = 0;
  for (const kib of touched.values()) sum += kib;
  return sum;
}
