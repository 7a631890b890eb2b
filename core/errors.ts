/**
 * DshieldError: every error a user may see carries a stable code and a message
 * the user can act on. The CLI prints `code: message` on one line for errors
 * marked `userError` (a mistake in config, flags or environment) and exits 2;
 * anything else is a bug or an environment failure and is printed with detail.
 */

export const ErrorCodes = {
  /** The config file or an override is malformed: unknown key, wrong type, bad value. */
  CONFIG: 'DSHIELD_ERR_CONFIG',
  /** A plugin could not be found, has a wrong export, or was given an option it does not take. */
  PLUGIN: 'DSHIELD_ERR_PLUGIN',
  /** A key is missing, malformed or unreadable. */
  KEY: 'DSHIELD_ERR_KEY',
  /** Command-line usage: unknown flag, missing value, unknown mode. */
  USAGE: 'DSHIELD_ERR_USAGE',
  /** Could not bind a listening address (in use, no permission). */
  LISTEN: 'DSHIELD_ERR_LISTEN',
  /** The server could not be reached (refused, unreachable, DNS failure). */
  UNREACHABLE: 'DSHIELD_ERR_UNREACHABLE',
  /** The server answered with a static key other than the pinned one: maybe a man in the middle. */
  SERVER_KEY_MISMATCH: 'DSHIELD_ERR_SERVER_KEY_MISMATCH',
  /** The server accepted the connection but never answered the handshake (unknown client key, wrong PSK, wrong cipher). */
  HANDSHAKE_TIMEOUT: 'DSHIELD_ERR_HANDSHAKE_TIMEOUT',
  /** A handshake or record failed authentication or was malformed. */
  PROTOCOL: 'DSHIELD_ERR_PROTOCOL',
  /** The egress policy refused a destination. */
  EGRESS_DENIED: 'DSHIELD_ERR_EGRESS_DENIED',
  /** The destination could not be reached from the server. */
  DESTINATION: 'DSHIELD_ERR_DESTINATION',
  /** A stream was reset by the other side or by shutdown. */
  STREAM_RESET: 'DSHIELD_ERR_STREAM_RESET',
  /** The tunnel is down and did not come back within the wait limit. */
  TUNNEL_DOWN: 'DSHIELD_ERR_TUNNEL_DOWN',
  /** The invite string is malformed. */
  INVITE: 'DSHIELD_ERR_INVITE',
  /** The feature is not supported here (platform, permissions, transport). */
  UNSUPPORTED: 'DSHIELD_ERR_UNSUPPORTED',
  /** A TUN-mode setup step failed (device, routes, DNS, firewall, address pool). */
  TUN: 'DSHIELD_ERR_TUN',
  /** Anything unexpected: a bug. */
  INTERNAL: 'DSHIELD_ERR_INTERNAL',
} as const;

export type ErrorCode = (typeof ErrorCodes)[keyof typeof ErrorCodes];

/** Codes that describe a user's mistake: printed as one line, exit code 2. */
const USER_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  ErrorCodes.CONFIG,
  ErrorCodes.PLUGIN,
  ErrorCodes.KEY,
  ErrorCodes.USAGE,
  ErrorCodes.LISTEN,
  ErrorCodes.INVITE,
  ErrorCodes.UNSUPPORTED,
  ErrorCodes.TUN,
]);

export class DshieldError extends Error {
  readonly code: ErrorCode;
  /** Extra structured detail (never secrets). */
  readonly detail?: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown; detail?: Record<string, unknown> }) {
    super(message, options?.cause !== undefined ? { cause: options.cause } : undefined);
    this.name = 'DshieldError';
    this.code = code;
    this.detail = options?.detail;
  }

  /** True when this error is a user's mistake: print one line, exit 2, no stack. */
  get userError(): boolean {
    return USER_CODES.has(this.code);
  }
}

export function isDshieldError(err: unknown, code?: ErrorCode): err is DshieldError {
  return err instanceof DshieldError && (code === undefined || err.code === code);
}

/**
 * Wraps an error thrown by a plugin so the user sees which plugin failed.
 * A DshieldError keeps its code; its message is prefixed with the plugin name.
 */
export function wrapPluginError(pluginName: string, kind: string, err: unknown): DshieldError {
  const label = `${kind} plugin "${pluginName}"`;
  if (err instanceof DshieldError) {
    if (err.message.startsWith(label)) return err;
    return new DshieldError(err.code, `${label}: ${err.message}`, { cause: err, detail: err.detail });
  }
  const msg = err instanceof Error ? err.message : String(err);
  return new DshieldError(ErrorCodes.PLUGIN, `${label}: ${msg}`, { cause: err });
}

/**
 * An Error for a routine event nobody debugs (a peer that went away without
 * saying goodbye), made without a stack trace: capturing one costs 5-8 µs,
 * more than the rest of a session's teardown, and the trace would only ever
 * point into the socket's close callback.
 */
export function errorWithoutStack(message: string): Error {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return new Error(message);
  } finally {
    Error.stackTraceLimit = limit;
  }
}
