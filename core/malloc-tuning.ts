/**
 * How glibc's malloc is set for a process that forwards traffic, applied
 * once by the CLI (next to core/gc-tuning.ts) before a client, server or
 * local mode starts.
 *
 * The problem it solves: Node keeps Buffer memory outside the JavaScript
 * heap, in malloc. A forwarding process allocates a 64 KiB buffer for every
 * socket read and frees it a moment later, hundreds of megabytes a second.
 * glibc gives memory at the top of its heap back to the OS as soon as
 * 128 KiB of it are free (M_TRIM_THRESHOLD), so after each garbage
 * collection the heap shrinks, the next buffers grow it again, and the
 * kernel hands out zeroed pages, one page fault per 4 KiB. Measured on
 * loopback through the SOCKS5 proxy (1 GiB down, first transfer): the
 * server took ~50,000-88,000 page faults per GiB and 5.2-5.6 CPU-seconds;
 * with a 32 MiB trim threshold ~17,000 faults and 3.3 CPU-seconds, and
 * 164 -> 231 MB/s.
 *
 * What it sets: M_TRIM_THRESHOLD 32 MiB (free memory above that at the top
 * of the heap still goes back to the OS, so an idle process does not keep a
 * burst's peak for ever), and M_MMAP_THRESHOLD 1 MiB. Setting either stops
 * glibc from adjusting the mmap threshold on its own, so it is set too:
 * without it every allocation of 128 KiB or more would be a fresh mmap.
 *
 * Only glibc (Linux) has these knobs; elsewhere, or without koffi, nothing
 * changes. GLIBC_TUNABLES / MALLOC_TRIM_THRESHOLD_ in the environment
 * would set the same, but only at process start, which the CLI does not
 * control.
 */
import { createRequire } from 'node:module';

type Koffi = typeof import('koffi');

/** mallopt parameters, from glibc's malloc.h. */
const M_TRIM_THRESHOLD = -1;
const M_MMAP_THRESHOLD = -3;

export const TRIM_THRESHOLD = 32 * 1024 * 1024;
export const MMAP_THRESHOLD = 1024 * 1024;

/**
 * Sets glibc's trim and mmap thresholds (above). Returns whether both were
 * set: false where there is no glibc mallopt (another libc, another OS, no
 * koffi). Never throws.
 */
export function tuneMalloc(): boolean {
  if (process.platform !== 'linux') return false;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as Koffi;
    // The process itself: libc is loaded, so its mallopt is found there.
    const mallopt = koffi.load(null as unknown as string).func('int mallopt(int param, int value)') as (param: number, value: number) => number;
    // musl has a mallopt that does nothing and returns 0: reported as not set.
    return mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) === 1 && mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) === 1;
  } catch {
    return false;
  }
}
