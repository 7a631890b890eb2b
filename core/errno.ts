/**
 * Linux errno numbers the libc bindings (core/tun/libc.ts, core/udp-io.ts)
 * act on, and every errno's name ("EPERM") from koffi's table, for messages
 * a user can look up.
 */
type Koffi = typeof import('koffi');

export const EINTR = 4;
export const EIO = 5;
export const EAGAIN = 11;
export const EINVAL = 22;
export const EMSGSIZE = 90;
export const ENOPROTOOPT = 92;
export const EOPNOTSUPP = 95;
export const ENOBUFS = 105;

/** errno numbers to their names; where two names share a number, the first in koffi's table wins. */
export function errnoNames(koffi: Koffi): Map<number, string> {
  const names = new Map<number, string>();
  for (const [name, value] of Object.entries(koffi.os.errno as Record<string, number>)) {
    if (!names.has(value)) names.set(value, name);
  }
  return names;
}
