/**
 * "host:port" strings as users write them in configs and as we print them in
 * logs. IPv6 addresses always travel in brackets ("[::1]:8443") because a
 * bare IPv6 address is ambiguous with a port glued to it.
 */
import { isIPv6 } from 'node:net';
import { DshieldError, ErrorCodes } from './errors.ts';

export interface HostPort {
  /** A hostname, an IPv4 address or an IPv6 address (without brackets). */
  host: string;
  /** An integer in [0, 65535]; 0 asks the OS for any free port when listening. */
  port: number;
}

const EXAMPLE = 'e.g. 127.0.0.1:8443, example.com:443 or [::1]:8443';

/**
 * Parses "host:port" or "[ipv6]:port". `what` names where the string came from
 * ("server.listen") so the error tells the user which setting to fix.
 * Throws DshieldError(CONFIG) for anything else.
 */
export function parseHostPort(s: string, what: string): HostPort {
  const fail = (why: string): never => {
    throw new DshieldError(ErrorCodes.CONFIG, `${what}: ${JSON.stringify(s)} ${why} (${EXAMPLE})`);
  };
  if (typeof s !== 'string' || s.trim() === '') fail('is empty; expected host:port');
  const text = s.trim();
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) fail('is a URL; expected host:port');

  let host: string;
  let portText: string;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    if (close < 0) fail('has "[" without a matching "]"');
    host = text.slice(1, close);
    if (text[close + 1] !== ':') fail('needs a port after the "]"');
    portText = text.slice(close + 2);
    // The zone ("fe80::1%eth0") is not something isIPv6 understands.
    if (!isIPv6(host.split('%')[0]!)) fail('has something other than an IPv6 address in brackets');
  } else {
    const colon = text.lastIndexOf(':');
    if (colon < 0) fail('has no port; expected host:port');
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(':')) fail('looks like an IPv6 address without brackets; write it as [address]:port');
  }

  if (host === '') fail('has no host; use 0.0.0.0 or [::] for every interface');
  if (/[\s/\\@[\]?#]/.test(host)) fail('has characters that cannot be in a host name');
  if (!/^\d{1,5}$/.test(portText)) fail('has a port that is not a number');
  const port = Number(portText);
  if (port > 65535) fail('has a port above 65535');
  return { host, port };
}

/** "host:port", with IPv6 addresses in brackets. */
export function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

/**
 * A socket's peer for logs: IPv4-mapped IPv6 addresses ("::ffff:1.2.3.4", which a
 * dual-stack listener reports) are shown as plain IPv4. A destroyed socket has no
 * address any more; that prints as "unknown:0" rather than throwing.
 */
export function formatPeer(address: string | undefined, port: number | undefined): string {
  if (!address) return `unknown:${port ?? 0}`;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  return formatHostPort(mapped ? mapped[1]! : address, port ?? 0);
}
