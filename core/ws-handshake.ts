/**
 * The HTTP/1.1 upgrade that opens a WebSocket (RFC 6455 section 4), both
 * sides, as the ws transport does it with no extensions and no subprotocol:
 *
 *   client: GET /path HTTP/1.1, Upgrade: websocket, Connection: Upgrade,
 *           Sec-WebSocket-Key: base64(16 random bytes), Sec-WebSocket-Version: 13
 *   server: HTTP/1.1 101 Switching Protocols, Upgrade: websocket,
 *           Connection: Upgrade, Sec-WebSocket-Accept: base64(SHA-1(key + GUID))
 *
 * The accept value proves that the answer is a WebSocket server's answer
 * to this request, not a cached or confused HTTP response. It proves
 * nothing about who the server is: the session's Noise handshake does that.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { IncomingMessage } from 'node:http';

/** RFC 6455's fixed GUID, appended to the key before hashing. */
const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
/** A Sec-WebSocket-Key: the base64 of 16 bytes (the last character's spare bits not checked, as other servers do not). */
const KEY_RE = /^[A-Za-z0-9+/]{22}==$/;

/** A fresh Sec-WebSocket-Key. */
export function newClientKey(): string {
  return randomBytes(16).toString('base64');
}

/** The Sec-WebSocket-Accept that answers `key`. */
export function acceptFor(key: string): string {
  return createHash('sha1').update(key + WS_GUID).digest('base64');
}

/** The client's upgrade request for `url` (ws:// or wss://), as one string of latin1 text. */
export function upgradeRequest(url: URL, key: string): string {
  const target = `${url.pathname || '/'}${url.search}`;
  return (
    `GET ${target} HTTP/1.1\r\n` +
    `Host: ${url.host}\r\n` +
    'Connection: Upgrade\r\n' +
    'Upgrade: websocket\r\n' +
    'Sec-WebSocket-Version: 13\r\n' +
    `Sec-WebSocket-Key: ${key}\r\n\r\n`
  );
}

export type UpgradeAnswer =
  | { ok: true }
  /** `status`: the HTTP status, or 0 when the head was not HTTP at all. */
  | { ok: false; status: number; why: string };

/**
 * Check the server's response head (everything before the blank line) to
 * the request made with `key`. Anything but a 101 with the right accept
 * value, and no extension or subprotocol we did not ask for, is refused.
 */
export function checkUpgradeAnswer(head: string, key: string): UpgradeAnswer {
  const lines = head.split('\r\n');
  const status = /^HTTP\/1\.[01] (\d{3})(?: |$)/.exec(lines[0] ?? '');
  if (!status) return { ok: false, status: 0, why: 'the answer was not HTTP' };
  const code = Number(status[1]);
  if (code !== 101) return { ok: false, status: code, why: `the web server answered HTTP ${code} instead of a WebSocket upgrade` };
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(':');
    if (colon <= 0) return { ok: false, status: code, why: 'the upgrade answer had a malformed header line' };
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim();
    // Repeated headers join with commas, as HTTP says they may.
    headers.set(name, headers.has(name) ? `${headers.get(name)}, ${value}` : value);
  }
  if (headers.get('upgrade')?.toLowerCase() !== 'websocket') return { ok: false, status: code, why: 'the upgrade answer did not say "Upgrade: websocket"' };
  if (headers.get('sec-websocket-accept') !== acceptFor(key)) return { ok: false, status: code, why: 'the upgrade answer had a wrong Sec-WebSocket-Accept' };
  if (headers.has('sec-websocket-extensions') || headers.has('sec-websocket-protocol')) {
    return { ok: false, status: code, why: 'the upgrade answer chose an extension or subprotocol that was not offered' };
  }
  return { ok: true };
}

/**
 * The key of a well-formed upgrade request (GET, Upgrade: websocket,
 * version 13, a key of 16 bytes), or undefined for anything else. Node's
 * HTTP server checked Connection: Upgrade before it called us.
 */
export function upgradeKeyOf(req: IncomingMessage): string | undefined {
  if (req.method !== 'GET') return undefined;
  if (req.headers.upgrade?.toLowerCase() !== 'websocket') return undefined;
  if (req.headers['sec-websocket-version'] !== '13') return undefined;
  const key = req.headers['sec-websocket-key'];
  return typeof key === 'string' && KEY_RE.test(key.trim()) ? key.trim() : undefined;
}

/** The server's 101 answer to a request with `key`. */
export function upgradeResponse(key: string): string {
  return `HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${acceptFor(key)}\r\n\r\n`;
}
