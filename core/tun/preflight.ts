/**
 * What TUN mode needs, checked before anything starts (before the client
 * dials, before the server listens), so a user without it gets one line at
 * once instead of a failure after the tunnel came up.
 */
import { accessSync, constants, readFileSync } from 'node:fs';
import { DshieldError, ErrorCodes } from '../errors.ts';

const CAP_NET_ADMIN = 12;

/** True when this process has CAP_NET_ADMIN in its effective set (root normally has). */
export function hasNetAdmin(): boolean {
  try {
    const status = readFileSync('/proc/self/status', 'utf8');
    const hex = /^CapEff:\s*([0-9a-f]+)$/m.exec(status)?.[1];
    if (hex === undefined) return process.getuid?.() === 0;
    return ((BigInt(`0x${hex}`) >> BigInt(CAP_NET_ADMIN)) & 1n) === 1n;
  } catch {
    return process.getuid?.() === 0;
  }
}

/**
 * Throws DshieldError UNSUPPORTED (not Linux) or TUN (no /dev/net/tun, no
 * root / CAP_NET_ADMIN), naming `setting` ("client.tun", "server.tun").
 */
export function checkTunPrerequisites(setting: string): void {
  if (process.platform !== 'linux') {
    throw new DshieldError(ErrorCodes.UNSUPPORTED, `${setting} needs Linux (this is ${process.platform}); turn ${setting} off`);
  }
  try {
    accessSync('/dev/net/tun', constants.R_OK | constants.W_OK);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      throw new DshieldError(
        ErrorCodes.TUN,
        `${setting} needs /dev/net/tun, which is missing here: load the tun module (modprobe tun), or in a container pass --device /dev/net/tun`,
      );
    }
    throw new DshieldError(ErrorCodes.TUN, `${setting} needs root (or CAP_NET_ADMIN) and /dev/net/tun: ${code ?? (err as Error).message}`);
  }
  if (!hasNetAdmin()) {
    throw new DshieldError(ErrorCodes.TUN, `${setting} needs root (or CAP_NET_ADMIN): run dshield with sudo, or turn ${setting} off to use the proxies only`);
  }
}
