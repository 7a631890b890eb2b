/**
 * errno numbers to their names ("EPERM"), from koffi's table, for the libc
 * bindings (core/tun/libc.ts, core/udp-io.ts) to put in messages a user can
 * look up. Where two names share a number, the first in the table wins.
 */
type Koffi = typeof import('koffi');

export function errnoNames(koffi: Koffi): Map<number, string> {
  const names = new Map<number, string>();
  for (const [name, value] of Object.entries(koffi.os.errno as Record<string, number>)) {
    if (!names.has(value)) names.set(value, name);
  }
  return names;
}
