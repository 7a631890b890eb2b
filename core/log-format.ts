/**
 * What every log sink needs to turn a LogRecord into text safely: level
 * ordering, redaction of secret-named fields, and a conversion of arbitrary
 * field values into bounded, JSON-safe data.
 *
 * Fields come from all over the code (and some values, like target host
 * names, come from the network), so nothing here may throw, recurse without
 * bound or let a value grow a log line without bound.
 */
import { isSecretName } from './keys.ts';
import type { LogLevel } from './types.ts';

export { LOG_LEVELS } from './log.ts';

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export function isLogLevel(value: unknown): value is LogLevel {
  return typeof value === 'string' && Object.hasOwn(RANK, value);
}

/** True when a record of `level` passes a sink whose minimum is `min`. Unknown levels pass. */
export function levelAtLeast(level: LogLevel, min: LogLevel): boolean {
  return (RANK[level] ?? RANK.error) >= RANK[min];
}

/**
 * Field names whose values are never written, whatever they hold (privateKey,
 * psk, password, secret, token, any other "...key" but the public ones).
 * Callers must not log secrets in the first place, and the core scrubs
 * top-level fields; this also covers nested ones, for sinks fed directly.
 */
export const isSecretField = isSecretName;
export const REDACTED = '<redacted>';

export interface SafeValueLimits {
  /** Longer strings are cut and marked with the number of characters left out. */
  maxString: number;
  /** Deeper objects become "[Object]" / "[Array]". */
  maxDepth: number;
  /** Array items and object keys past this many are summarized. */
  maxEntries: number;
}

export const DEFAULT_LIMITS: SafeValueLimits = { maxString: 2048, maxDepth: 4, maxEntries: 50 };

export function truncate(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max)}…(+${text.length - max} chars)`;
}

/** An Error as one line: "CODE: message" when it carries a code its message does not already name. */
export function errorText(err: Error): string {
  const code = (err as { code?: unknown }).code;
  let message: string;
  try {
    message = String(err.message);
  } catch {
    message = '';
  }
  if (message === '') message = err.name || 'Error';
  return typeof code === 'string' && !message.includes(code) ? `${code}: ${message}` : message;
}

/**
 * `value` as plain JSON-compatible data: strings, finite numbers, booleans,
 * null, arrays and plain objects only. Errors become their message, BigInts
 * and Dates strings, Buffers a byte count (raw bytes might be key material),
 * cycles "[Circular]", functions and symbols a description. Secret-named keys
 * at any depth become "<redacted>". Returns undefined for undefined.
 * Never throws (a getter that throws gives "[Unreadable]").
 */
export function toSafeValue(value: unknown, limits: SafeValueLimits = DEFAULT_LIMITS): unknown {
  const ancestors: object[] = [];

  const walk = (v: unknown, depth: number): unknown => {
    switch (typeof v) {
      case 'string':
        return truncate(v, limits.maxString);
      case 'number':
        return Number.isFinite(v) ? v : String(v);
      case 'boolean':
        return v;
      case 'undefined':
        return undefined;
      case 'bigint':
        return v.toString();
      case 'symbol':
        return v === UNREADABLE ? '[Unreadable]' : v.toString();
      case 'function':
        return `[Function ${v.name || 'anonymous'}]`;
    }
    if (v === null) return null;
    const obj = v as object;
    if (obj instanceof Error) return truncate(errorText(obj), limits.maxString);
    if (obj instanceof Date) return Number.isNaN(obj.getTime()) ? 'Invalid Date' : obj.toISOString();
    if (ArrayBuffer.isView(obj) || obj instanceof ArrayBuffer) return `<${obj.byteLength} bytes>`;
    if (ancestors.includes(obj)) return '[Circular]';
    const isArray = Array.isArray(obj);
    if (depth >= limits.maxDepth) return isArray ? '[Array]' : '[Object]';

    ancestors.push(obj);
    try {
      if (isArray) {
        const items = obj as unknown[];
        const out: unknown[] = [];
        const n = Math.min(items.length, limits.maxEntries);
        for (let i = 0; i < n; i++) {
          const item = readSafely(() => items[i]);
          const safe = walk(item, depth + 1);
          out.push(safe === undefined ? null : safe);
        }
        if (items.length > n) out.push(`…(+${items.length - n} items)`);
        return out;
      }
      const out: Record<string, unknown> = {};
      let keys: string[];
      try {
        keys = Object.keys(obj);
      } catch {
        return '[Unreadable]';
      }
      const n = Math.min(keys.length, limits.maxEntries);
      for (let i = 0; i < n; i++) {
        const key = keys[i]!;
        if (isSecretField(key)) {
          out[key] = REDACTED;
          continue;
        }
        const safe = walk(readSafely(() => (obj as Record<string, unknown>)[key]), depth + 1);
        if (safe !== undefined) out[key] = safe;
      }
      if (keys.length > n) out['…'] = `+${keys.length - n} keys`;
      return out;
    } finally {
      ancestors.pop();
    }
  };

  try {
    return walk(value, 0);
  } catch {
    return '[Unreadable]';
  }
}

const UNREADABLE = Symbol('unreadable');

function readSafely(read: () => unknown): unknown {
  try {
    return read();
  } catch {
    return UNREADABLE;
  }
}

/**
 * The record's fields made safe (see toSafeValue), secret-named ones
 * redacted, undefined ones left out. Never throws.
 */
export function safeFields(
  fields: Record<string, unknown> | undefined,
  limits: SafeValueLimits = DEFAULT_LIMITS,
): Record<string, unknown> {
  if (fields === null || typeof fields !== 'object') return {};
  const safe = toSafeValue(fields, { ...limits, maxDepth: limits.maxDepth + 1 });
  return safe !== null && typeof safe === 'object' && !Array.isArray(safe) ? (safe as Record<string, unknown>) : {};
}

/**
 * Control characters (C0, DEL, C1 and the Unicode line separators) written as
 * escapes, so a logged value can neither break a line nor drive a terminal.
 */
export function escapeControls(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => {
    if (c === '\n') return '\\n';
    if (c === '\r') return '\\r';
    if (c === '\t') return '\\t';
    return `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
}
